-- Release a domain lease, only if this session holds it (compare and delete).
-- KEYS[1] lease STRING    bridge:{d}:lease
-- ARGV[1] token
-- Returns 1 when released, 0 when it was not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
