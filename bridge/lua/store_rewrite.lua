-- Replace a stored message's envelope, keeping its content (redis store).
-- KEYS[1] message STRING  bridge:{d}:q:<queue>:<qid>
-- KEYS[2] index HASH      bridge:{d}:msg:<qid> (updated when it exists)
-- ARGV[1] the new envelope JSON
-- ARGV[2] recipients (JSON, as the index keeps them)
-- ARGV[3] '1' when the sender has had a delay warning, else ''
-- Returns 1 when replaced, 0 when there is no such message.
local message, entry = KEYS[1], KEYS[2]
local envelope, rcpts, warned = ARGV[1], ARGV[2], ARGV[3]
local value = redis.call('GET', message)
if not value then
  return 0
end
local eol = string.find(value, '\n', 1, true)
local stored, count, length
if eol then
  stored, count, length = string.match(string.sub(value, 1, eol - 1), '^(%S+) (%d+) (%d+)$')
end
if not stored then
  return redis.error_reply('ERR corrupt message header in ' .. message)
end
local content = string.sub(value, eol + 1 + tonumber(length))
redis.call('SET', message, stored .. ' ' .. count .. ' ' .. #envelope .. '\n' .. envelope .. content)
if redis.call('EXISTS', entry) == 1 then
  redis.call('HSET', entry, 'rcpts', rcpts)
  if warned == '1' then
    redis.call('HSET', entry, 'warned', '1')
  end
end
return 1
