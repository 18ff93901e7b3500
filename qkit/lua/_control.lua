-- _control.lua: shared part (spliced in at a script's "-- include _control.lua" line; never run alone).
-- Expects `control` to name the queue's control hash ('paused', 'cancel:<id>').  Made another type by
-- something else, it would fail every HSET/HKEYS and wedge pause and cancel: it is dropped.
local function check_control()
  local kind = redis.call('TYPE', control)
  if type(kind) == 'table' then kind = kind.ok or kind['ok'] end
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', control) end
end
check_control()
-- end of _control.lua
