-- remove.lua: take jobs out of Redis entirely (DLQ purge, audit repair of entries
-- whose ledger row is gone).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio,
-- KEYS[7] clock, KEYS[8] control (unused), KEYS[9] limits, KEYS[10] types   (same layout as claim.lua)
-- ARGV[1] scope  'dead' (only from the DLQ) or 'all' (from every place)
-- ARGV[2..] ids
-- Returns the number of entries removed.  A job no longer anywhere loses its type entry; a lease of a
-- limited type removed here gives its concurrency slot back.
-- include _prio.lua
local scope = ARGV[1]
local removed = 0
local typed = redis.call('EXISTS', KEYS[10]) == 1
for i = 2, #ARGV do
  local id = ARGV[i]
  removed = removed + redis.call('ZREM', KEYS[5], id)
  local was_leased = 0
  if scope == 'all' then
    was_leased = redis.call('ZREM', KEYS[3], id)
    removed = removed + redis.call('ZREM', KEYS[1], id) + redis.call('ZREM', KEYS[2], id) + was_leased
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[6], id)
  end
  if typed and (scope == 'all' or not (redis.call('ZSCORE', KEYS[1], id) or redis.call('ZSCORE', KEYS[2], id)
                                       or redis.call('ZSCORE', KEYS[3], id))) then
    local t = redis.call('HGET', KEYS[10], id)
    if t and was_leased == 1 and redis.call('HEXISTS', KEYS[9], 'L:' .. t) == 1 then
      local n = tonumber(redis.call('HGET', KEYS[9], 'R:' .. t)) or 0
      redis.call('HSET', KEYS[9], 'R:' .. t, math.max(0, n - 1))
    end
    if t then redis.call('HDEL', KEYS[10], id) end
  end
end
return removed
