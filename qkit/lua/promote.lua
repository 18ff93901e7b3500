-- promote.lua: a delayed job becomes due now, on Redis's clock (q.promote).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio,
-- KEYS[7] clock   (same layout and ready-score formula as claim.lua)
-- ARGV[1] aging  priority aging A, seconds per priority level ('0': strict priority)
-- ARGV[2] id
-- Returns {moved, now_ms}: moved 1 when the job was delayed and is ready now, else 0.
local ready, delayed, prio = KEYS[1], KEYS[2], KEYS[6]
local aging = tonumber(ARGV[1]) or 0
local id = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- include _ready.lua
-- include _prio.lua

if not redis.call('ZSCORE', delayed, id) then return {0, now} end
local p = tonumber(redis.call('HGET', prio, id)) or 0
if p ~= p then p = 0 end
p = math.max(-1000000, math.min(1000000, p))
redis.call('ZREM', delayed, id)
redis.call('HDEL', prio, id)
redis.call('ZADD', ready, ready_score(id, p), id)
save_clock()
return {1, now}
