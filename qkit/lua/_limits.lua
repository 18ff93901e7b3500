-- _limits.lua: shared part of claim.lua (spliced in at its "-- include _limits.lua" line; never run alone):
-- limits per job type, read and kept on Redis's clock (docs/semantics.md#limits-per-type).
-- Expects `now` (ms of Redis TIME), KEYS[9] (limits) and KEYS[10] (types).
--
-- KEYS[9] limits   hash  'L:<type>' -> '<rate> <per_ms> <concurrency>' (0: no such limit)
--                       'R:<type>' -> leases of that type held now (concurrency in use)
--                       'W:<type>' -> rate window: 'bucket:count ...', bucket = floor(ms * LIMIT_BUCKETS / per_ms)
-- KEYS[10] types   hash  id -> type, kept only for jobs of a limited type (push.lua writes it)
--
-- The rate window is a sliding log in LIMIT_BUCKETS buckets per `per` (1 ms wide for per = 1 s): a start is
-- allowed when fewer than `rate` starts fall in the buckets that overlap (now - per, now].  Counting whole
-- buckets errs on the safe side, so no window of `per` seconds ever holds more than `rate` starts, and a
-- window reopens at most one bucket late.  Only buckets holding a start are kept: at most min(rate,
-- LIMIT_BUCKETS + 1) of them.  (ms * LIMIT_BUCKETS stays an exact integer in a double until year 2255.)
local LIMIT_BUCKETS = 1000
local lim, running, window, used, lim_dirty = {}, {}, {}, {}, {}
local function load_limits()  -- true when the queue has a limit; a limits key of another type is ignored
  local ok, flat = pcall(redis.call, 'HGETALL', KEYS[9])
  if not ok or type(flat) ~= 'table' then return false end
  local any = false
  for i = 1, #flat, 2 do
    local kind, name, v = string.sub(flat[i], 1, 2), string.sub(flat[i], 3), flat[i + 1]
    if kind == 'L:' then
      local r, p, c = string.match(v, '^(%d+) (%d+) (%d+)$')
      if r and tonumber(p) > 0 then lim[name] = {tonumber(r), tonumber(p), tonumber(c)}; any = true end
    elseif kind == 'R:' then
      running[name] = math.max(0, tonumber(v) or 0)
    elseif kind == 'W:' then
      window[name] = v
    end
  end
  return any
end
local function bucket_of(per, ms) return math.floor(ms * LIMIT_BUCKETS / per) end
-- the buckets of type t still inside its window, and how many starts they hold (parsed once per call)
local function window_of(t, l)
  if used[t] == nil then
    -- starts in (now - per, now] on the µs clock are in ms >= now - per: their buckets are all counted
    local oldest, kept, n = bucket_of(l[2], now - l[2]), {}, 0
    if type(window[t]) == 'string' then
      for k, c in string.gmatch(window[t], '(%d+):(%d+)') do
        k, c = tonumber(k), tonumber(c)
        if k >= oldest then kept[#kept + 1] = {k, c}; n = n + c end
      end
    end
    window[t], used[t] = kept, n
  end
  return window[t]
end
-- how many more jobs of type t may start now (a large number when t has no limit of that kind)
local function limit_room(t, l)
  local room = 1000000000
  if l[1] > 0 then window_of(t, l); room = l[1] - used[t] end
  if l[3] > 0 then room = math.min(room, l[3] - (running[t] or 0)) end
  return math.max(0, room)
end
-- ms until type t, held by its rate, may start again (nil: not held by its rate)
local function rate_reopens(t, l)
  if l[1] == 0 or used[t] < l[1] or #window[t] == 0 then return nil end
  return math.max(1, math.ceil((window[t][1][1] + 1) * l[2] / LIMIT_BUCKETS) + l[2] - now)
end
-- one job of type t starts now; `slot`: it takes a concurrency slot (false: a lease taken over keeps its slot)
local function limit_take(t, l, slot)
  if l[1] > 0 then
    local w, k = window_of(t, l), bucket_of(l[2], now)
    if #w > 0 and w[#w][1] == k then w[#w][2] = w[#w][2] + 1 else w[#w + 1] = {k, 1} end
    used[t] = used[t] + 1
  end
  if slot then running[t] = (running[t] or 0) + 1 end
  lim_dirty[t] = true
end
local function limit_give_back(t)  -- a lease of type t ended (settled)
  running[t] = math.max(0, (running[t] or 0) - 1)
  lim_dirty[t] = true
end
local function save_limits()
  local args = {}
  for t in pairs(lim_dirty) do
    args[#args + 1] = 'R:' .. t
    args[#args + 1] = running[t]
    if type(window[t]) == 'table' then
      local parts = {}
      for _, b in ipairs(window[t]) do parts[#parts + 1] = string.format('%.0f:%d', b[1], b[2]) end
      args[#args + 1] = 'W:' .. t
      args[#args + 1] = table.concat(parts, ' ')
    end
  end
  if #args > 0 then redis.call('HSET', KEYS[9], unpack(args)) end
end
-- end of _limits.lua
