-- Read a stored message's STRING and its first piece in one round trip (redis store).
-- KEYS[1] message STRING  bridge:{d}:q:<queue>:<qid>
-- KEYS[2] pieces LIST     bridge:{d}:body:<qid>
-- Returns nil when there is no such message, else {the STRING, the number of
-- pieces in the LIST, the first of them (nil when there is none)}.
local value = redis.call('GET', KEYS[1])
if not value then
  return false
end
return {value, redis.call('LLEN', KEYS[2]), redis.call('LINDEX', KEYS[2], 0)}
