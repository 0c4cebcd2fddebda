-- Count one failed AUTH; the window starts at the first failure.
-- KEYS[1] counter STRING  bridge:authfail:addr:<ip> or bridge:authfail:user:<user>
-- ARGV[1] window (milliseconds)
-- Returns the failures counted in the current window.
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
