-- Drop one message from the index (delivered, failed, deleted or gone from the spool).
-- KEYS[1] deferred ZSET   bridge:{d}:deferred
-- KEYS[2] hold ZSET       bridge:{d}:hold
-- KEYS[3] message HASH    bridge:{d}:msg:<qid>
-- KEYS[4] stats HASH      bridge:{d}:stats
-- ARGV[1] qid
-- Returns 1 when removed, 0 when it was not indexed.
local size = redis.call('HGET', KEYS[3], 'size')
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not size then
  return 0
end
redis.call('DEL', KEYS[3])
redis.call('HINCRBY', KEYS[4], 'messages', -1)
redis.call('HINCRBY', KEYS[4], 'bytes', -tonumber(size))
return 1
