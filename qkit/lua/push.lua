-- push.lua: make jobs pending in Redis (enqueue, retry repair, DLQ replay, rebuild).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio,
-- KEYS[7] clock, KEYS[8] control, KEYS[9] limits, KEYS[10] types   (same layout and ready-score formula as claim.lua)
-- ARGV[1] mode  'new'    (enqueue: a job already leased or dead-lettered is left alone)
--               'repair' (replay and rebuild: a dead-lettered job is taken out of the DLQ)
--               'dead'   (rebuild of the DLQ: a job found nowhere is put in the DLQ)
-- ARGV[2] aging priority aging A, seconds per priority level ('0': strict priority)
-- ARGV[3] typed '1': groups of 4 follow, id, priority, delay_ms (0: ready now), type ('': not known);
--               '0' or '-': groups of 3, without the type ('-': the caller does not know the types and
--               restores them itself, as a repair does).  A job whose type has a limit (field 'L:<type>' of
--               KEYS[9]) gets its type in KEYS[10], which the claim reads.  So that a queue without limits
--               pays nothing for them, an enqueue sends no types until a push finds the queue has limits:
--               an untyped 'new' push to a queue with limits does nothing and returns added = -1 (the
--               caller sends it again with the types).
-- Publishes the number of jobs added (ready or delayed) on the channel named like KEYS[1] (a channel, not a
-- key: nothing is stored) when there are any: a `qkit work --forever` worker sleeps subscribed to it, and
-- wakes to claim them or to learn when the first delayed one falls due.
-- Returns {added, now_ms, limits}: the number of jobs added, Redis TIME in ms (callers write the
-- ledger's due times from it: one clock for every writer), and 1 if the queue has limits (0 if not).
-- A job already leased is never added, and ZADD NX never
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

local has_limits = redis.call('EXISTS', KEYS[9])
local step = ARGV[3] == '1' and 4 or 3
if ARGV[3] == '0' and mode == 'new' and has_limits == 1 then return {-1, now, 1} end
local added = 0
local limited, typed = {}, {}
for i = 4, #ARGV, step do
  local id, p, delay, jtype = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), step == 4 and ARGV[i + 3] or ''
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
    if jtype ~= '' then  -- only a job pushed here gets its type: a lease's slot was counted when it was taken
      if limited[jtype] == nil then
        local ok, has = pcall(redis.call, 'HEXISTS', KEYS[9], 'L:' .. jtype)
        limited[jtype] = ok and has == 1
      end
      if limited[jtype] then
        typed[#typed + 1] = id
        typed[#typed + 1] = jtype
      end
    end
    if delay > 0 then
      added = added + redis.call('ZADD', delayed, 'NX', now + delay, id)
      redis.call('HSET', prio, id, p)
    else
      added = added + redis.call('ZADD', ready, 'NX', ready_score(id, p), id)
    end
  end
end
if added > 0 and mode ~= 'dead' then redis.call('PUBLISH', ready, added) end
if #typed > 0 then redis.call('HSET', KEYS[10], unpack(typed)) end
save_clock()
return {added, now, has_limits}
