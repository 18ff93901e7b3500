-- push.lua: make jobs pending in Redis (enqueue, retry repair, DLQ replay, rebuild).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio,
-- KEYS[7] clock   (same layout and ready-score formula as claim.lua)
-- ARGV[1] mode  'new'    (enqueue: a job already leased or dead-lettered is left alone)
--               'repair' (replay and rebuild: a dead-lettered job is taken out of the DLQ)
--               'dead'   (rebuild of the DLQ: a job found nowhere is put in the DLQ)
-- ARGV[2] aging priority aging A, seconds per priority level ('0': strict priority)
-- ARGV[3..]     groups of 3: id, priority, delay_ms (0: ready now)
-- Publishes the number of jobs added (ready or delayed) on the channel named like KEYS[1] (a channel, not a
-- key: nothing is stored) when there are any: a `qkit work --forever` worker sleeps subscribed to it, and
-- wakes to claim them or to learn when the first delayed one falls due.
-- Returns {added, now_ms}: the number of jobs added and Redis TIME in ms (callers write the
-- ledger's due times from it: one clock for every writer).  A job already leased is never added, and ZADD NX never
-- adds one twice to a set, so pushing is idempotent: a late or repeated push cannot let two
-- workers hold one job (an extra entry of a finished job is dropped when claimed).
local ready, delayed, leased, dead, prio = KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6]
local mode = ARGV[1]
local aging = tonumber(ARGV[2]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- include _ready.lua
-- include _prio.lua

local added = 0
for i = 3, #ARGV, 3 do
  local id, p, delay = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  -- a leased job is never pushed again: that would let a second worker take it mid-attempt.
  -- A new id (fresh from the ledger) can be elsewhere only after a repair pushed it first,
  -- and ZADD NX below keeps it single; other modes check every place.
  local skip = redis.call('ZSCORE', leased, id)
  if not skip and mode ~= 'new' then
    skip = redis.call('ZSCORE', ready, id) or redis.call('ZSCORE', delayed, id)
  end
  if not skip and mode ~= 'new' and redis.call('ZSCORE', dead, id) then
    if mode == 'repair' then redis.call('ZREM', dead, id) else skip = true end
  end
  if not skip and mode == 'dead' then
    redis.call('ZADD', dead, now, id)
    added = added + 1
  elseif not skip then
    if delay > 0 then
      added = added + redis.call('ZADD', delayed, 'NX', now + delay, id)
      redis.call('HSET', prio, id, p)
    else
      added = added + redis.call('ZADD', ready, 'NX', ready_score(id, p), id)
    end
  end
end
if added > 0 and mode ~= 'dead' then redis.call('PUBLISH', ready, added) end
save_clock()
return {added, now}
