-- limits.lua: set, remove and restore a queue's limits per job type (q.limit, q.unlimit, audit --repair).
-- Not a job's state change: it writes only the limits' working copy the claim reads (the ledger's
-- queue_controls rows are the truth, docs/semantics.md#limits-per-type).
--
-- KEYS[1] ready, KEYS[2] delayed, KEYS[3] leased, KEYS[4] owners, KEYS[5] dead, KEYS[6] prio, KEYS[7] clock,
-- KEYS[8] control (unused), KEYS[9] limits, KEYS[10] types   (same layout as claim.lua; the limits hash's
-- fields are described in _limits.lua)
-- ARGV[1] op:
--   'replace' ARGV[2..] pairs of type, '<rate> <per_ms> <concurrency>': these are the queue's limits, all
--             of them (other types' limits and state go; a type whose per changed starts a new window).
--             Returns the number of limits.
--   'tag'     ARGV[2] type, ARGV[3..] ids: the type entry of each id found in ready, delayed, leased or dead.
--             Returns how many were tagged.
--   'recount' concurrency in use of every limited type := its leases held now (typed ones).
--             Returns {type, leases, ...}.
--   'count'   for the audit, written nowhere: {type, leases held, slots counted in use, ...}.
--   'read'    Returns the limits hash as stored: {field, value, ...}.
local limits, types = KEYS[9], KEYS[10]
local op = ARGV[1]
-- a key of another type was written by something else: it would fail every claim's read, so it goes
for _, key in ipairs({limits, types}) do
  local kind = redis.call('TYPE', key)
  if type(kind) == 'table' then kind = kind.ok or kind['ok'] end
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', key) end
end

if op == 'replace' then
  local want = {}
  for i = 2, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
  local flat = redis.call('HGETALL', limits)
  local drop = {}
  for i = 1, #flat, 2 do
    local kind, name = string.sub(flat[i], 1, 2), string.sub(flat[i], 3)
    if kind == 'L:' then
      local new = want[name]
      local old_per, new_per = string.match(flat[i + 1], '^%d+ (%d+) '), new and string.match(new, '^%d+ (%d+) ')
      if new == nil then
        drop[#drop + 1] = 'L:' .. name
        drop[#drop + 1] = 'R:' .. name
        drop[#drop + 1] = 'W:' .. name
      elseif old_per ~= new_per then
        drop[#drop + 1] = 'W:' .. name
      end
    elseif kind ~= 'R:' and kind ~= 'W:' then
      drop[#drop + 1] = flat[i]  -- not written by qkit
    end
  end
  if #drop > 0 then redis.call('HDEL', limits, unpack(drop)) end
  local n = 0
  for name, spec in pairs(want) do
    redis.call('HSET', limits, 'L:' .. name, spec)
    n = n + 1
  end
  return n
elseif op == 'tag' then
  local jtype, tagged = ARGV[2], 0
  for i = 3, #ARGV do
    local id = ARGV[i]
    if redis.call('ZSCORE', KEYS[1], id) or redis.call('ZSCORE', KEYS[2], id) or redis.call('ZSCORE', KEYS[3], id)
        or redis.call('ZSCORE', KEYS[5], id) then
      redis.call('HSET', types, id, jtype)
      tagged = tagged + 1
    end
  end
  return tagged
elseif op == 'recount' or op == 'count' then
  local count, out = {}, {}
  local flat = redis.call('HGETALL', limits)
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'L:' then count[string.sub(flat[i], 3)] = 0 end
  end
  local ids = redis.call('ZRANGE', KEYS[3], 0, -1)
  for start = 1, #ids, 1000 do
    local chunk = {unpack(ids, start, math.min(#ids, start + 999))}
    local tps = redis.call('HMGET', types, unpack(chunk))
    for j = 1, #chunk do
      local t = tps[j]
      if t and count[t] then count[t] = count[t] + 1 end
    end
  end
  for t, n in pairs(count) do
    out[#out + 1] = t
    out[#out + 1] = n
    if op == 'recount' then
      redis.call('HSET', limits, 'R:' .. t, n)
    else
      out[#out + 1] = tonumber(redis.call('HGET', limits, 'R:' .. t)) or 0
    end
  end
  return out
elseif op == 'read' then
  return redis.call('HGETALL', limits)
end
return redis.error_reply('limits.lua: unknown op')
