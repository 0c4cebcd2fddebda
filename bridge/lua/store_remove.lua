-- Drop a stored message, or set it aside as corrupt, with its index entry (redis store).
-- KEYS[1] message STRING  bridge:{d}:q:<queue>:<qid>
-- KEYS[2] pieces LIST     bridge:{d}:body:<qid>
-- KEYS[3] deferred ZSET   bridge:{d}:deferred   } the index, as
-- KEYS[4] hold ZSET       bridge:{d}:hold       } index_remove.lua
-- KEYS[5] index HASH      bridge:{d}:msg:<qid>  } keeps it
-- KEYS[6] stats HASH      bridge:{d}:stats      }
-- KEYS[7] corrupt STRING  bridge:{d}:corrupt:<qid>
-- ARGV[1] qid
-- ARGV[2] 'quarantine': rename the message to KEYS[7] (its pieces stay); else drop it
-- ARGV[3] '1' when the message is indexed (deferred, hold), else ''
-- Returns 1 when the message was there, 0 when it was gone already (nothing changes).
local message, pieces, deferred, hold, entry, stats, corrupt = KEYS[1], KEYS[2], KEYS[3],
  KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local qid, how, indexed = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', message) == 0 then
  return 0
end
if how == 'quarantine' then
  redis.call('RENAME', message, corrupt)
else
  -- UNLINK: a large message is freed in the background, not in this script.
  redis.call('UNLINK', message, pieces)
end
if indexed == '1' then
  redis.call('ZREM', deferred, qid)
  redis.call('ZREM', hold, qid)
  local size = redis.call('HGET', entry, 'size')
  if size then
    redis.call('DEL', entry)
    redis.call('HINCRBY', stats, 'messages', -1)
    redis.call('HINCRBY', stats, 'bytes', -tonumber(size))
  end
end
return 1
