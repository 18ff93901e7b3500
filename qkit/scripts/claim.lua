-- claim.lua: settle the outcomes of a worker's last batch, then claim its next one.
-- One call per batch is the whole Redis cost of a burst (Upstash bills per command).
--
-- KEYS[1] ready    zset  id -> (1000000 - priority) * 2^32 + id   (higher priority first, FIFO by id)
-- KEYS[2] delayed  zset  id -> due time, ms of Redis TIME
-- KEYS[3] leased   zset  id -> lease deadline, ms of Redis TIME
-- KEYS[4] owners   hash  id -> fence token of the worker holding the lease
-- KEYS[5] dead     zset  id -> time it was dead-lettered, ms
-- KEYS[6] prio     hash  id -> priority, for delayed jobs only
-- ARGV[1] token     this worker's fence token (unique per burst)
-- ARGV[2] lease_ms  lease length for claimed jobs
-- ARGV[3] want      how many jobs to claim (0: settle only)
-- ARGV[4] n         number of settlements that follow
-- ARGV[5..]         n groups of 4: id, action, delay_ms, priority
--                   action 'done' (completed, or dropped because the ledger says so),
--                   'retry' (back to ready after delay_ms), 'dead' (to the DLQ)
-- Returns {now_ms, reclaimed, claimed, fenced, next_due_ms, ready_count}
--   reclaimed  {id, old_token} of one expired lease taken over, or {}.  An expired lease is
--              reclaimed alone, with nothing else claimed in the same call: its worker died
--              holding a batch, and running each survivor alone keeps a job that kills its
--              worker from costing attempts to the jobs batched with it.
--   claimed    ids popped from ready, highest priority first
--   fenced     settlement ids refused because this token no longer holds their lease
--   next_due_ms  ms until the earliest delayed job is due, -1 if none
local ready, delayed, leased, owners, dead, prio = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local token, lease_ms, want, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function ready_score(id, p)
  return string.format('%.0f', (1000000 - p) * 4294967296 + id)
end

local fenced = {}
local i = 5
for _ = 1, n do
  local id, action, delay, p = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  if redis.call('HGET', owners, id) == token then
    redis.call('ZREM', leased, id)
    redis.call('HDEL', owners, id)
    if action == 'retry' then
      if delay <= 0 then
        redis.call('ZADD', ready, ready_score(tonumber(id), p), id)
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
  local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, 1)
  for _, id in ipairs(expired) do
    reclaimed[#reclaimed + 1] = id
    reclaimed[#reclaimed + 1] = redis.call('HGET', owners, id) or ''
    redis.call('ZADD', leased, deadline, id)
    redis.call('HSET', owners, id, token)
    want = 0
  end
  -- due delayed jobs join ready before popping, so priority holds among everything due
  local due = {}
  if want > 0 then due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000) end
  if #due > 0 then
    local prios = redis.call('HMGET', prio, unpack(due))
    for j, id in ipairs(due) do
      redis.call('ZADD', ready, ready_score(tonumber(id), tonumber(prios[j]) or 0), id)
    end
    redis.call('ZREM', delayed, unpack(due))
    redis.call('HDEL', prio, unpack(due))
  end
  local room = want
  if room > 0 then
    local popped = redis.call('ZPOPMIN', ready, room)
    if #popped > 0 then
      local lease_args, owner_args = {}, {}
      for j = 1, #popped, 2 do
        local id = popped[j]
        claimed[#claimed + 1] = id
        lease_args[#lease_args + 1] = deadline
        lease_args[#lease_args + 1] = id
        owner_args[#owner_args + 1] = id
        owner_args[#owner_args + 1] = token
      end
      redis.call('ZADD', leased, unpack(lease_args))
      redis.call('HSET', owners, unpack(owner_args))
    end
  end
end

local next_due = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #first > 0 then
  next_due = math.max(0, tonumber(first[2]) - now)
end
return {now, reclaimed, claimed, fenced, next_due, redis.call('ZCARD', ready)}
