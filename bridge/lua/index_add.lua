-- Index one held message, unless it is indexed already (commit and reindex).
-- KEYS[1] queue ZSET      bridge:{d}:deferred (or bridge:{d}:hold when on hold)
-- KEYS[2] message HASH    bridge:{d}:msg:<qid>
-- KEYS[3] stats HASH      bridge:{d}:stats
-- KEYS[4] domains SET     bridge:domains (outside the domain's slot: no Redis Cluster)
-- ARGV[1] qid
-- ARGV[2] arrival (unix seconds)
-- ARGV[3] size (bytes)
-- ARGV[4] sender
-- ARGV[5] recipients (JSON)
-- ARGV[6] domain
-- ARGV[7] 'hold' when the message is on hold, else ''
-- Returns 1 when added, 0 when it was there already.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('HSET', KEYS[2], 'arrival', ARGV[2], 'size', ARGV[3],
           'sender', ARGV[4], 'rcpts', ARGV[5])
if ARGV[7] == 'hold' then
  redis.call('HSET', KEYS[2], 'queue', 'hold')
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'messages', 1)
redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[3])
redis.call('SADD', KEYS[4], ARGV[6])
return 1
