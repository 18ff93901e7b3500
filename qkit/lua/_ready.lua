-- _ready.lua: shared part of push.lua and claim.lua (spliced in by qkit/lua/__init__.py at
-- its "-- include _ready.lua" line; never run alone).  Expects `aging` (ARGV) and `now_us`
-- (Redis TIME) to be defined, and KEYS[7] to be the queue's clock key.
--
-- ready score, strict (aging 0): (1000000 - priority) * 2^32 + id    (higher priority first, FIFO by id)
-- with aging A > 0 s: since_us - EPOCH_US - round(priority * A * 10^6), since_us = when the job became due
local EPOCH_US = 1577836800000000  -- 2020-01-01T00:00:00Z: keeps aged scores small and exact
--: a clock key further ahead of Redis TIME than this is junk, not a burst of pushes in one µs
local CLOCK_AHEAD_MAX_US = 86400 * 1000000
local function aged_score(since_us, p)
  return string.format('%.0f', since_us - EPOCH_US - math.floor(p * aging * 1000000 + 0.5))
end
-- The clock key holds the last since_us given to a ready job.  qkit writes only integers near Redis
-- TIME; anything else (text, NaN, inf, 1e30, negative, another key type) was written by something else
-- and would wedge the queue (a Lua error) or end FIFO for good (1e30 + 1 == 1e30): it restarts at now.
local last_us = nil
local function read_clock()
  local v = redis.pcall('GET', KEYS[7])
  v = type(v) == 'string' and tonumber(v) or nil
  if v == nil or v ~= v or v < 0 or v > now_us + CLOCK_AHEAD_MAX_US then return 0 end
  return math.floor(v)
end
local function next_since()  -- now, or 1 µs after the last job made ready (aging only)
  if last_us == nil then last_us = read_clock() end
  last_us = math.max(now_us, last_us + 1)
  return last_us
end
local function ready_score(id, p)
  if aging > 0 then return aged_score(next_since(), p) end
  return string.format('%.0f', (1000000 - p) * 4294967296 + tonumber(id))
end
local function save_clock()  -- SET replaces a value of any type
  if last_us ~= nil then redis.call('SET', KEYS[7], string.format('%.0f', last_us)) end
end
-- end of _ready.lua
