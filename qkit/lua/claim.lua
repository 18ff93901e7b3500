-- claim.lua: settle the outcomes of a worker's last batch, then claim its next one.
-- One call per batch is the whole Redis cost of a burst (Upstash bills per command).
--
-- KEYS[1] ready    zset  id -> score, lowest first.  Strict (aging 0):
--                        (1000000 - priority) * 2^32 + id   (higher priority first, FIFO by id)
--                        With aging A > 0 s: since_us - EPOCH_US - round(priority * A * 10^6), where since_us
--                        is when the job became due (µs of Redis TIME, made unique by KEYS[7]): a job of
--                        priority p sorts like a priority-0 job that became due A*p seconds earlier.
-- KEYS[2] delayed  zset  id -> due time, ms of Redis TIME
-- KEYS[3] leased   zset  id -> lease deadline, ms of Redis TIME
-- KEYS[4] owners   hash  id -> fence token of the worker holding the lease
-- KEYS[5] dead     zset  id -> time it was dead-lettered, ms
-- KEYS[6] prio     hash  id -> priority, for delayed jobs only
-- KEYS[7] clock    string  last since_us given to a ready job (aging only): keeps since_us strictly
--                        increasing, so jobs that become due in one call or one µs stay FIFO
-- KEYS[8] control  hash    'paused' while the queue is paused (pause.lua): nothing is claimed, settlements
--                        still apply; 'cancel:<id>' flags (cancel.lua, read by renew.lua)
-- ARGV[1] token     this worker's fence token (unique per burst)
-- ARGV[2] lease_ms  lease length for claimed jobs
-- ARGV[3] want      how many jobs to claim (0: settle only)
-- ARGV[4] n         number of settlements that follow
-- ARGV[5] aging     priority aging A, seconds per priority level ('0': strict priority)
-- ARGV[6..]         n groups of 4: id, action, delay_ms, priority
--                   action 'done' (completed, or dropped because the ledger says so),
--                   'retry' (back to ready after delay_ms), 'dead' (to the DLQ)
-- Returns {now_ms, reclaimed, claimed, fenced, next_due_ms, ready_count, malformed, paused}
--   reclaimed  {id, old_token} of one expired lease taken over, or {}.  An expired lease is
--              reclaimed alone, with nothing else claimed in the same call: its worker died
--              holding a batch, and running each survivor alone keeps a job that kills its
--              worker from costing attempts to the jobs batched with it.
--   claimed    ids popped from ready, lowest score first (highest priority, then FIFO)
--   fenced     settlement ids refused because this token no longer holds their lease
--   next_due_ms  ms until the earliest delayed job is due, -1 if none
--   malformed  how many members that are not job ids (decimal 1..2^63-1, as qkit writes them) were found in
--              ready, due delayed or expired leased, and removed.  They are never returned,
--              never leased and never run: only the ledger says what a job is (docs/semantics.md#the-promise; S1 in docs/reliability.md).
--   paused     1 when the queue is paused (nothing was claimed), else 0
local ready, delayed, leased, owners, dead, prio = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local token, lease_ms, want, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local aging = tonumber(ARGV[5]) or 0
local paused = want > 0 and redis.pcall('HEXISTS', KEYS[8], 'paused') == 1  -- an error reply: not paused
if paused then want = 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- include _ready.lua
-- include _prio.lua
-- include _ids.lua

local function clamp_priority(p)
  p = tonumber(p) or 0
  if p ~= p then return 0 end
  return math.max(-1000000, math.min(1000000, p))
end
local malformed = 0

local fenced = {}
local holders = {}
if n > 0 then
  local ids = {}
  for j = 0, n - 1 do ids[#ids + 1] = ARGV[6 + 4 * j] end
  holders = redis.call('HMGET', owners, unpack(ids))
  local mine = {}
  for j, id in ipairs(ids) do
    if holders[j] == token then mine[#mine + 1] = id end
  end
  if #mine > 0 then
    redis.call('ZREM', leased, unpack(mine))
    redis.call('HDEL', owners, unpack(mine))
  end
end
local i = 6
for j = 1, n do
  local id, action, delay, p = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  if holders[j] == token then
    if action == 'retry' then
      if delay <= 0 then
        redis.call('ZADD', ready, ready_score(id, p), id)
      else
        redis.call('ZADD', delayed, now + delay, id)
        redis.call('HSET', prio, id, p)
      end
    elseif action == 'dead' then
      redis.call('ZADD', dead, now, id)
    end
  else
    fenced[#fenced + 1] = id
  end
end

local reclaimed, claimed = {}, {}
if want > 0 then
  local deadline = now + lease_ms
  -- expired leases first: their workers died or stalled; the caller records the lost attempt
  while want > 0 do
    local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, 1)
    if #expired == 0 then break end
    local id = expired[1]
    if is_id(id) then
      reclaimed[#reclaimed + 1] = id
      reclaimed[#reclaimed + 1] = clean_token(redis.call('HGET', owners, id))
      redis.call('ZADD', leased, deadline, id)
      redis.call('HSET', owners, id, token)
      want = 0
    else
      redis.call('ZREM', leased, id)
      redis.call('HDEL', owners, id)
      malformed = malformed + 1
    end
  end
  -- due delayed jobs join ready before popping, so priority holds among everything due
  local due, ids, due_ms = {}, {}, {}
  if want > 0 then due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000) end
  if #due > 0 then
    local junk = {}
    for j = 1, #due, 2 do
      if is_id(due[j]) then
        ids[#ids + 1] = due[j]
        due_ms[due[j]] = tonumber(due[j + 1])
      else
        junk[#junk + 1] = due[j]
      end
    end
    if #junk > 0 then
      redis.call('ZREM', delayed, unpack(junk))
      redis.call('HDEL', prio, unpack(junk))
      malformed = malformed + #junk
    end
  end
  if #due > 0 and #ids > 0 then
    local prios = redis.call('HMGET', prio, unpack(ids))
    local prio_of = {}
    for j, id in ipairs(ids) do prio_of[id] = clamp_priority(prios[j]) end
    if aging > 0 then
      -- aged from the moment it became due; jobs due in the same ms keep id (FIFO) order
      table.sort(ids, function(a, b)
        if due_ms[a] ~= due_ms[b] then return due_ms[a] < due_ms[b] end
        return tonumber(a) < tonumber(b)
      end)
      local prev_ms, offset = nil, 0
      for _, id in ipairs(ids) do
        if due_ms[id] == prev_ms then offset = offset + 1 else prev_ms, offset = due_ms[id], 0 end
        redis.call('ZADD', ready, aged_score(due_ms[id] * 1000 + offset, prio_of[id]), id)
      end
    else
      for _, id in ipairs(ids) do
        redis.call('ZADD', ready, ready_score(id, prio_of[id]), id)
      end
    end
    redis.call('ZREM', delayed, unpack(ids))
    redis.call('HDEL', prio, unpack(ids))
  end
  local room = want
  local lease_args, owner_args = {}, {}
  while room > 0 do  -- each round pops at least one member, so this ends
    local popped = redis.call('ZPOPMIN', ready, room)
    if #popped == 0 then break end
    for j = 1, #popped, 2 do
      local id = popped[j]
      if is_id(id) then
        claimed[#claimed + 1] = id
        lease_args[#lease_args + 1] = deadline
        lease_args[#lease_args + 1] = id
        owner_args[#owner_args + 1] = id
        owner_args[#owner_args + 1] = token
        room = room - 1
      else
        malformed = malformed + 1  -- popped: gone from ready, never leased
      end
    end
  end
  if #lease_args > 0 then
    redis.call('ZADD', leased, unpack(lease_args))
    redis.call('HSET', owners, unpack(owner_args))
  end
end

save_clock()

local next_due = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #first > 0 then
  next_due = math.max(0, tonumber(first[2]) - now)
end
return {now, reclaimed, claimed, fenced, next_due, redis.call('ZCARD', ready), malformed, paused and 1 or 0}
