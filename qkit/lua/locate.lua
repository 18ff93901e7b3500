-- locate.lua: where one job is in Redis, for `qkit explain` (read only; one command, O(log n)).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio
--   (same layout as claim.lua)
-- ARGV[1] id
-- Returns {now_ms, ready_score, ready_rank, ready_count, delayed_due_ms, delayed_priority,
--          lease_deadline_ms, owner, dead_ms}
--   each entry nil when the job is not in that place; ready_rank is 0-based (jobs ahead of it),
--   scores are returned as strings (exact), ready_count is the size of the ready set.
local id = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- false becomes a nil reply; a Lua nil would end the array early
return {now,
        redis.call('ZSCORE', KEYS[1], id) or false,
        redis.call('ZRANK', KEYS[1], id) or false,
        redis.call('ZCARD', KEYS[1]),
        redis.call('ZSCORE', KEYS[2], id) or false,
        redis.call('HGET', KEYS[6], id) or false,
        redis.call('ZSCORE', KEYS[3], id) or false,
        redis.call('HGET', KEYS[4], id) or false,
        redis.call('ZSCORE', KEYS[5], id) or false}
