-- renew.lua: extend the leases a worker still holds, while its handlers run.
--
-- KEYS[1] leased zset (id -> deadline ms), KEYS[2] owners hash (id -> token),
-- KEYS[3] control hash ('cancel:<id>' set by cancel.lua for a leased job whose cancel was requested)
-- ARGV[1] token, ARGV[2] lease_ms, ARGV[3..] ids
-- Returns {lost, cancel}: lost, the ids whose lease this token no longer holds (reclaimed by another
-- worker, or Redis lost them): their outcome will be fenced off; cancel, the ids still held whose
-- cancel was requested (the worker tells their handlers: current_job().cancel_requested).
local leased, owners, control = KEYS[1], KEYS[2], KEYS[3]
local token, lease_ms = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + lease_ms
local lost, cancel = {}, {}
local n_flags = redis.pcall('HLEN', control)  -- an error reply (not a hash) counts as no flag
local flagged = type(n_flags) == 'number' and n_flags > 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', owners, id) == token then
    redis.call('ZADD', leased, 'XX', deadline, id)
    if flagged and redis.call('HEXISTS', control, 'cancel:' .. id) == 1 then cancel[#cancel + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancel}
