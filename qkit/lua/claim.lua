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
-- KEYS[9] limits   hash  limits per job type and their state (layout in _limits.lua)
-- KEYS[10] types   hash  id -> type, for jobs of a limited type only
-- ARGV[1] token     this worker's fence token (unique per burst)
-- ARGV[2] lease_ms  lease length for claimed jobs
-- ARGV[3] want      how many jobs to claim (0: settle only)
-- ARGV[4] n         number of settlements that follow
-- ARGV[5] aging     priority aging A, seconds per priority level ('0': strict priority)
-- ARGV[6..]         n groups of 4: id, action, delay_ms, priority
--                   action 'done' (completed, or dropped because the ledger says so),
--                   'retry' (back to ready after delay_ms), 'dead' (to the DLQ)
-- Returns {now_ms, reclaimed, claimed, fenced, next_due_ms, ready_count, malformed, paused, held, now_us}
--   reclaimed  {id, old_token} of one expired lease taken over, or {}.  An expired lease is
--              reclaimed alone, with nothing else claimed in the same call: its worker died
--              holding a batch, and running each survivor alone keeps a job that kills its
--              worker from costing attempts to the jobs batched with it.
--   claimed    ids popped from ready, lowest score first (highest priority, then FIFO)
--   fenced     settlement ids refused because this token no longer holds their lease
--   next_due_ms  ms until the earliest delayed job is due or a rate limit that held a job back reopens,
--              -1 if neither
--   malformed  how many members that are not job ids (decimal 1..2^63-1, as qkit writes them) were found in
--              ready, due delayed or expired leased, and removed.  They are never returned,
--              never leased and never run: only the ledger says what a job is (docs/semantics.md#the-promise; S1 in docs/reliability.md).
--   paused     1 when the queue is paused (nothing was claimed), else 0
--   held       {type, jobs, why, ...}: jobs passed over because their type is at its limit ('rate' or
--              'concurrency'); they stay ready and spend no attempt.  The scan past held jobs stops after
--              HOLD_SCAN of them, so a huge backlog of a held type cannot make a claim slow.
--   now_us     Redis TIME in µs (text): when the claimed attempts start
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
-- include _limits.lua

local function clamp_priority(p)
  p = tonumber(p) or 0
  if p ~= p then return 0 end
  return math.max(-1000000, math.min(1000000, p))
end
local malformed = 0
--: how many held-back jobs one claim looks past before it gives up on the rest of ready
local HOLD_SCAN = 1000
-- limits cost a queue without typed jobs one TYPE inside the script: types are written only for limited types
-- (a types key of another type was written by something else and would wedge the claim: it goes)
local function types_kind()
  local kind = redis.call('TYPE', KEYS[10])
  if type(kind) == 'table' then kind = kind.ok or kind['ok'] end
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[10]) end
  return kind
end
local typed = types_kind() == 'hash'
local limited = typed and load_limits()
local held, held_why, held_wake = {}, {}, nil
local function hold(t, l)  -- one job of type t passed over: its type is at its limit
  held[t] = (held[t] or 0) + 1
  -- a full rate window says when it reopens (no claim can take the type before, a free slot or not);
  -- a full concurrency alone cannot say when a slot frees: the worker polls
  local w = rate_reopens(t, l)
  if w then
    held_why[t] = 'rate'
    if held_wake == nil or w < held_wake then held_wake = w end
  else
    held_why[t] = 'concurrency'
  end
end

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
    if typed then  -- a settled lease of a limited type gives its concurrency slot back
      local tps, back = redis.call('HMGET', KEYS[10], unpack(mine)), {}
      for j, id in ipairs(mine) do
        if tps[j] and lim[tps[j]] and not back[id] then limit_give_back(tps[j]); back[id] = true end
      end
    end
  end
end
local gone = {}  -- settled for good: their type entry goes (a retry or a DLQ entry keeps it)
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
    elseif typed then
      gone[#gone + 1] = id
    end
  else
    fenced[#fenced + 1] = id
  end
end

if #gone > 0 then redis.call('HDEL', KEYS[10], unpack(gone)) end

local reclaimed, claimed = {}, {}
if want > 0 then
  local deadline = now + lease_ms
  -- expired leases first: their workers died or stalled; the caller records the lost attempt
  while want > 0 do
    local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, 1)
    if #expired == 0 then break end
    local id = expired[1]
    -- taking over a lease starts an attempt: it counts against the rate (its slot is already counted)
    local t = limited and redis.call('HGET', KEYS[10], id)
    local l = t and lim[t]
    if l and l[1] > 0 and limit_room(t, {l[1], l[2], 0}) == 0 then
      hold(t, l)
      break  -- it stays expired until the window has room; other work is still claimed
    end
    if is_id(id) then
      if l then limit_take(t, l, false) end
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
  local function lease(id)
    claimed[#claimed + 1] = id
    lease_args[#lease_args + 1] = deadline
    lease_args[#lease_args + 1] = id
    owner_args[#owner_args + 1] = id
    owner_args[#owner_args + 1] = token
    room = room - 1
  end
  -- with limits: walk ready in order, passing over jobs whose type is at its limit (they stay ready).
  -- A batch that takes jobs of a type with a concurrency limit ends with them: the slots are given
  -- back when the batch is settled, so nothing else may make that batch long.
  local skipped, offset, cut = 0, 0, nil
  while limited and room > 0 and skipped < HOLD_SCAN do
    local members = redis.call('ZRANGE', ready, offset, offset + math.min(1000, room + HOLD_SCAN - skipped) - 1)
    if #members == 0 then break end
    local valid = {}
    for _, m in ipairs(members) do if is_id(m) then valid[#valid + 1] = m end end
    local tps = #valid > 0 and redis.call('HMGET', KEYS[10], unpack(valid)) or {}
    local out, k, seen = {}, 0, 0
    for _, m in ipairs(members) do
      if room == 0 then break end
      seen = seen + 1
      if not is_id(m) then
        out[#out + 1] = m
        malformed = malformed + 1  -- removed: never leased
      else
        k = k + 1
        local t = tps[k]
        local l = t and lim[t]
        if cut and (t ~= cut or held[t]) then seen = seen - 1; room = 0; break end
        if not l then
          out[#out + 1] = m; lease(m)
        elseif held[t] then
          held[t] = held[t] + 1; skipped = skipped + 1
        elseif limit_room(t, l) > 0 then
          limit_take(t, l, true)
          out[#out + 1] = m; lease(m)
          if l[3] > 0 then cut = t end
        else
          hold(t, l); skipped = skipped + 1
        end
      end
    end
    if #out > 0 then redis.call('ZREM', ready, unpack(out)) end
    if seen < #members then break end
    offset = offset + #members - #out
  end
  while not limited and room > 0 do  -- each round pops at least one member, so this ends
    local popped = redis.call('ZPOPMIN', ready, room)
    if #popped == 0 then break end
    for j = 1, #popped, 2 do
      local id = popped[j]
      if is_id(id) then
        lease(id)
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
if typed then save_limits() end

local next_due = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #first > 0 then
  next_due = math.max(0, tonumber(first[2]) - now)
end
if held_wake and (next_due < 0 or held_wake < next_due) then next_due = held_wake end
local held_out = {}
for t, n in pairs(held) do
  held_out[#held_out + 1] = t
  held_out[#held_out + 1] = n
  held_out[#held_out + 1] = held_why[t]
end
return {now, reclaimed, claimed, fenced, next_due, redis.call('ZCARD', ready), malformed, paused and 1 or 0,
        held_out,
        string.format('%.0f', now_us)}
