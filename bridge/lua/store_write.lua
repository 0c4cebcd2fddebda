-- Store one message (redis store): its pieces into place, its record, its index entry.
-- KEYS[1] message STRING  bridge:{d}:q:<queue>:<qid>  "<stored> <pieces> <envelope length>\n"
--                         + envelope JSON + the content's first bytes
-- KEYS[2] incoming LIST   bridge:{d}:incoming:<qid>   pieces as written (expiring)
-- KEYS[3] pieces LIST     bridge:{d}:body:<qid>       where they go
-- KEYS[4] queue ZSET      bridge:{d}:deferred (or bridge:{d}:hold)   } the index, as
-- KEYS[5] index HASH      bridge:{d}:msg:<qid>                       } index_add.lua
-- KEYS[6] stats HASH      bridge:{d}:stats                           } keeps it
-- ARGV[1] the message STRING's value
-- ARGV[2] pieces in the incoming list (0: none)
-- ARGV[3] 'deferred' or 'hold': index it there; '' (bounce): no index entry
-- ARGV[4] qid
-- ARGV[5] arrival (unix seconds)
-- ARGV[6] size (bytes)
-- ARGV[7] sender
-- ARGV[8] recipients (JSON, as the index keeps them)
-- ARGV[9] the last piece, to go after the incoming ones; '' when there is none
-- Returns 1 when stored, 0 when the message was there already.
-- Under maxmemory the first write (SET) is refused and nothing is stored.
local message, incoming, pieces, queue, entry, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local value, appended, index_in = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local qid, arrival, size, sender, rcpts, last = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
  ARGV[9]
if redis.call('EXISTS', message) == 1 then
  return 0
end
if appended > 0 and redis.call('LLEN', incoming) ~= appended then
  return redis.error_reply('ERR incomplete message: pieces missing from ' .. incoming)
end
redis.call('SET', message, value)
if appended > 0 then
  redis.call('RENAME', incoming, pieces)
  redis.call('PERSIST', pieces)
else
  redis.call('DEL', pieces)
end
if last ~= '' then
  redis.call('RPUSH', pieces, last)
end
if index_in ~= '' and redis.call('EXISTS', entry) == 0 then
  redis.call('HSET', entry, 'arrival', arrival, 'size', size, 'sender', sender, 'rcpts', rcpts)
  if index_in == 'hold' then
    redis.call('HSET', entry, 'queue', 'hold')
  end
  redis.call('ZADD', queue, arrival, qid)
  redis.call('HINCRBY', stats, 'messages', 1)
  redis.call('HINCRBY', stats, 'bytes', size)
end
return 1
