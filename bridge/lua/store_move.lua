-- Move a stored message between queues (hold, release) with its index entry (redis store).
-- KEYS[1] source STRING   bridge:{d}:q:<source>:<qid>
-- KEYS[2] target STRING   bridge:{d}:q:<target>:<qid>
-- KEYS[3] source ZSET     bridge:{d}:deferred or bridge:{d}:hold   } the index, as
-- KEYS[4] target ZSET     bridge:{d}:hold or bridge:{d}:deferred   } index_move.lua
-- KEYS[5] index HASH      bridge:{d}:msg:<qid>                     } keeps it
-- ARGV[1] qid
-- ARGV[2] 'hold' when the target is the hold queue, else ''
-- ARGV[3] '1' to move the index entry too (between deferred and hold), else ''
-- Returns 1 when moved, 0 when the message is not in the source queue.
local source, target, from, to, entry = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local qid, on_hold, reindex = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', source) == 0 then
  return 0
end
if redis.call('EXISTS', target) == 1 then
  return redis.error_reply('ERR ' .. target .. ' exists already')
end
redis.call('RENAME', source, target)
if reindex == '1' then
  local score = redis.call('ZSCORE', from, qid)
  if score then
    redis.call('ZREM', from, qid)
    redis.call('ZADD', to, score, qid)
    if on_hold == 'hold' then
      redis.call('HSET', entry, 'queue', 'hold')
    else
      redis.call('HDEL', entry, 'queue')
    end
  end
end
return 1
