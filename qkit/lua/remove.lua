-- remove.lua: take jobs out of Redis entirely (DLQ purge, audit repair of entries
-- whose ledger row is gone).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio
-- ARGV[1] scope  'dead' (only from the DLQ) or 'all' (from every place)
-- ARGV[2..] ids
-- Returns the number of entries removed.
-- include _prio.lua
local scope = ARGV[1]
local removed = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  removed = removed + redis.call('ZREM', KEYS[5], id)
  if scope == 'all' then
    removed = removed + redis.call('ZREM', KEYS[1], id) + redis.call('ZREM', KEYS[2], id)
      + redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[6], id)
  end
end
return removed
