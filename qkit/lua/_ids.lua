-- _ids.lua: shared part of claim.lua and inventory.lua (spliced in at a script's
-- "-- include _ids.lua" line; never run alone): what qkit itself writes into a queue's keys.
-- a job id as qkit writes it: decimal, no sign, no leading zero, 1..2^63-1 (BIGINT)
local function is_id(m)
  local len = string.len(m)
  if len > 19 or string.find(m, '^[1-9][0-9]*$') == nil then return false end
  return len < 19 or m <= '9223372036854775807'  -- same length: text order is numeric order
end
-- a fence token as workers make them; anything else is reported as unknown
local function clean_token(v)
  if type(v) == 'string' and string.len(v) <= 128 and string.find(v, '^[%w%._:-]*$') then return v end
  return ''
end
-- end of _ids.lua
