-- Index one held message, unless it is indexed already (commit and reindex).
-- KEYS[1] queue ZSET      bridge:{d}:deferred (or bridge:{d}:hold when on hold)
-- KEYS[2] message HASH    bridge:{d}:msg:<qid>
-- KEYS[3] stats HASH      bridge:{d}:stats
-- (All in the domain's slot; the caller adds d to bridge:domains first, by itself.)
-- ARGV[1] qid
-- ARGV[2] arrival (unix seconds)
-- ARGV[3] size (bytes)
-- ARGV[4] sender
-- ARGV[5] recipients (JSON)
-- ARGV[6] 'hold' when the message is on hold, else ''
-- Returns 1 when added, 0 when it was there already.
local queue, message, stats = KEYS[1], KEYS[2], KEYS[3]
local qid, arrival, size, sender, rcpts, on_hold = ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[6]
if redis.call('EXISTS', message) == 1 then
  return 0
end
redis.call('HSET', message, 'arrival', arrival, 'size', size, 'sender', sender, 'rcpts', rcpts)
if on_hold == 'hold' then
  redis.call('HSET', message, 'queue', 'hold')
end
redis.call('ZADD', queue, arrival, qid)
redis.call('HINCRBY', stats, 'messages', 1)
redis.call('HINCRBY', stats, 'bytes', size)
return 1
