-- inventory.lua: where the jobs of a queue are, read in one atomic snapshot.
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio
-- ARGV[1] 'counts' or 'full'
-- Returns for 'counts': {now_ms, #ready, #delayed, #leased, #dead, #delayed due now, #leases expired}
--         for 'full':   {now_ms, ready ids, delayed {id, due_ms, ...},
--                        leased {id, deadline_ms, owner, ...}, dead ids}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'counts' then
  return {now, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
          redis.call('ZCARD', KEYS[5]), redis.call('ZCOUNT', KEYS[2], '-inf', now),
          redis.call('ZCOUNT', KEYS[3], '-inf', now)}
end
local leased = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
local with_owner = {}
for i = 1, #leased, 2 do
  with_owner[#with_owner + 1] = leased[i]
  with_owner[#with_owner + 1] = leased[i + 1]
  with_owner[#with_owner + 1] = redis.call('HGET', KEYS[4], leased[i]) or ''
end
return {now, redis.call('ZRANGE', KEYS[1], 0, -1), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'),
        with_owner, redis.call('ZRANGE', KEYS[5], 0, -1)}
