-- push.lua: make jobs pending in Redis (enqueue, retry repair, DLQ replay, rebuild).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio
--   (same layout as claim.lua)
-- ARGV[1] mode  'new'    (enqueue: a job already leased or dead-lettered is left alone)
--               'repair' (replay and rebuild: a dead-lettered job is taken out of the DLQ)
--               'dead'   (rebuild of the DLQ: a job found nowhere is put in the DLQ)
-- ARGV[2..]     groups of 3: id, priority, delay_ms (0: ready now)
-- Returns the number of jobs added.  A job already ready, delayed or leased is never
-- added twice, so pushing is idempotent and a late or repeated push cannot duplicate a job.
local ready, delayed, leased, dead, prio = KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6]
local mode = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = 0
for i = 2, #ARGV, 3 do
  local id, p, delay = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local skip = redis.call('ZSCORE', leased, id) or redis.call('ZSCORE', ready, id)
    or redis.call('ZSCORE', delayed, id)
  if not skip and redis.call('ZSCORE', dead, id) then
    if mode == 'repair' then redis.call('ZREM', dead, id) else skip = true end
  end
  if not skip and mode == 'dead' then
    redis.call('ZADD', dead, now, id)
    added = added + 1
  elseif not skip then
    if delay > 0 then
      redis.call('ZADD', delayed, now + delay, id)
      redis.call('HSET', prio, id, p)
    else
      redis.call('ZADD', ready, string.format('%.0f', (1000000 - p) * 4294967296 + tonumber(id)), id)
    end
    added = added + 1
  end
end
return added
