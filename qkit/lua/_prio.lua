-- _prio.lua: shared part (spliced in at a script's "-- include _prio.lua" line; never run alone).
-- KEYS[6] (prio) is a hash qkit keeps for delayed jobs.  Made another type by something else, it
-- would fail every HSET/HMGET/HDEL and wedge the queue: it is dropped (a delayed job without an
-- entry is ready at priority 0, like a junk entry; see clamp_priority in claim.lua).
local function check_prio()
  local kind = redis.call('TYPE', KEYS[6])
  if type(kind) == 'table' then kind = kind.ok or kind['ok'] end
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[6]) end
end
check_prio()
-- end of _prio.lua
