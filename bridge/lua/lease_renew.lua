-- Extend a domain lease, only if this session still holds it.
-- KEYS[1] lease STRING    bridge:{d}:lease
-- ARGV[1] token
-- ARGV[2] ttl (milliseconds)
-- Returns 1 when renewed, 0 when the lease is lost.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
