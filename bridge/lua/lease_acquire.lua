-- Take a domain lease if nobody holds it (as SET NX PX), also when Redis is at
-- maxmemory: a full Redis (intake says 452 4.3.1) must still let customers
-- collect, or nothing ever frees the memory.
-- KEYS[1] lease STRING    bridge:{d}:lease
-- ARGV[1] token
-- ARGV[2] ttl (milliseconds)
-- Returns 1 when taken, 0 when someone holds it.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
-- Redis (noeviction) refuses a script's memory-growing write at maxmemory only
-- when it is the script's first write; DEL (of the absent key) never grows
-- memory and comes first, so the small SET below is allowed.  (Redis >= 7 could
-- say "#!lua flags=allow-oom" instead; this works on Redis 6 too.)
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
