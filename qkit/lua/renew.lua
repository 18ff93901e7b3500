-- renew.lua: extend the leases a worker still holds, while its handlers run.
--
-- KEYS[1] leased zset (id -> deadline ms), KEYS[2] owners hash (id -> token)
-- ARGV[1] token, ARGV[2] lease_ms, ARGV[3..] ids
-- Returns the ids whose lease this token no longer holds (reclaimed by another worker,
-- or Redis lost them): their outcome will be fenced off.
local leased, owners = KEYS[1], KEYS[2]
local token, lease_ms = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + lease_ms
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', owners, id) == token then
    redis.call('ZADD', leased, 'XX', deadline, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
