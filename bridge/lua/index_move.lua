-- Move one indexed message between the deferred and hold sets (hold, release).
-- KEYS[1] source ZSET     bridge:{d}:deferred or bridge:{d}:hold
-- KEYS[2] target ZSET     bridge:{d}:hold or bridge:{d}:deferred
-- KEYS[3] message HASH    bridge:{d}:msg:<qid>
-- ARGV[1] qid
-- ARGV[2] 'hold' when the target is the hold set, else ''
-- Returns 1 when moved, 0 when the message was not in the source set.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], score, ARGV[1])
if ARGV[2] == 'hold' then
  redis.call('HSET', KEYS[3], 'queue', 'hold')
else
  redis.call('HDEL', KEYS[3], 'queue')
end
return 1
