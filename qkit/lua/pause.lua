-- pause.lua: pause or resume a queue's claims (docs/semantics.md#cancel-pause-promote).
--
-- KEYS[1] control  hash (KEYS[8] of claim.lua): field 'paused' present while the queue is paused
-- ARGV[1] '1' to pause, '0' to resume
-- Returns 1 when the state changed, 0 when it already was so.
local control = KEYS[1]
-- include _control.lua
if ARGV[1] == '1' then
  return redis.call('HSETNX', KEYS[1], 'paused', '1')
end
return redis.call('HDEL', KEYS[1], 'paused')
