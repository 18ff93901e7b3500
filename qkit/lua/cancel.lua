-- cancel.lua: the Redis half of q.cancel, after the ledger decided (docs/semantics.md#cancel-pause-promote).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio,
-- KEYS[7] clock, KEYS[8] control  hash: 'paused' (see pause.lua) and 'cancel:<id>' for each leased job
--                                  whose cancel was requested (the worker reads them with renew.lua)
-- KEYS[9] limits (unused), KEYS[10] types: a removed job's type entry goes   (same layout as claim.lua)
-- ARGV[1] id
-- ARGV[2] mode  'remove' (the ledger cancelled a pending job: out of ready and delayed; a lease is left
--                         to its worker, whose claim finds the row cancelled and drops the job unrun)
--               'flag'   (the ledger recorded a cancel request for a processing job: flag it if leased)
-- Returns 1 when an entry was removed or a flag set, else 0.  Flags of jobs no longer leased are
-- dropped on the way (a flag only matters while its job is leased).
local ready, delayed, leased, prio, control = KEYS[1], KEYS[2], KEYS[3], KEYS[6], KEYS[8]
local id, mode = ARGV[1], ARGV[2]
-- include _prio.lua
-- include _control.lua
local fields = redis.call('HKEYS', control)
local stale = {}
for _, f in ipairs(fields) do
  if string.sub(f, 1, 7) == 'cancel:' and not redis.call('ZSCORE', leased, string.sub(f, 8)) then
    stale[#stale + 1] = f
  end
end
if #stale > 0 then redis.call('HDEL', control, unpack(stale)) end
if mode == 'remove' then
  local n = redis.call('ZREM', ready, id) + redis.call('ZREM', delayed, id)
  redis.call('HDEL', prio, id)
  if n > 0 then redis.pcall('HDEL', KEYS[10], id) end  -- (a types key of another type: claim.lua drops it)
  return n > 0 and 1 or 0
end
if redis.call('ZSCORE', leased, id) then
  redis.call('HSET', control, 'cancel:' .. id, '1')
  return 1
end
return 0
