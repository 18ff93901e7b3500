-- inventory.lua: where the jobs of a queue are, read in one atomic snapshot.
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio,
-- KEYS[7] clock, KEYS[8] control (hash; 'paused' while the queue is paused)
-- ARGV[1] 'counts' or 'full'
-- Returns for 'counts': {now_ms, #ready, #delayed, #leased, #dead, #delayed due now, #leases expired,
--                        paused (1 or 0)}
--         for 'full':   {now_ms, ready ids, delayed {id, due_ms, ...},
--                        leased {id, deadline_ms, owner, ...}, dead ids}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'counts' then
  return {now, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
          redis.call('ZCARD', KEYS[5]), redis.call('ZCOUNT', KEYS[2], '-inf', now),
          redis.call('ZCOUNT', KEYS[3], '-inf', now),
          redis.pcall('HEXISTS', KEYS[8], 'paused') == 1 and 1 or 0}
end
-- 'full' lists job ids only: a member that is not one (decimal 1..2^63-1, as qkit writes them) was
-- written by something else; it is left out here, and claim.lua removes it without running anything
-- include _ids.lua
local function ids_of(members, step)
  local out = {}
  for i = 1, #members, step do
    if is_id(members[i]) then
      for j = 0, step - 1 do out[#out + 1] = members[i + j] end
    end
  end
  return out
end
local leased = ids_of(redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES'), 2)
local with_owner = {}
for i = 1, #leased, 2 do
  with_owner[#with_owner + 1] = leased[i]
  with_owner[#with_owner + 1] = leased[i + 1]
  with_owner[#with_owner + 1] = clean_token(redis.call('HGET', KEYS[4], leased[i]))
end
return {now, ids_of(redis.call('ZRANGE', KEYS[1], 0, -1), 1), ids_of(redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'), 2),
        with_owner, ids_of(redis.call('ZRANGE', KEYS[5], 0, -1), 1)}
