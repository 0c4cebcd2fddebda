-- Admit one new connection from a client address, or say which limit it hits
-- (Postfix's anvil, shared by every bridge instance on this Redis).
-- KEYS[1] conns  ZSET   bridge:anvil:{<ip>}:conns  connection id -> deadline (ms, Redis time)
-- KEYS[2] rate   STRING bridge:anvil:{<ip>}:rate   connections in the current window
-- ARGV[1] id             this connection's id (node:n)
-- ARGV[2] ttl            ms a registration lives unless its node renews it
-- ARGV[3] max_conns      concurrent connections allowed (0: no limit)
-- ARGV[4] max_rate       connections allowed per window (0: no limit)
-- ARGV[5] window         the rate window (ms)
-- Returns 0 admitted (and registered), 1 too many connections, 2 rate exceeded.
local conns, rate = KEYS[1], KEYS[2]
local id, ttl = ARGV[1], tonumber(ARGV[2])
local max_conns, max_rate, window = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Registrations of a node that died lapse at their deadline.
redis.call('ZREMRANGEBYSCORE', conns, '-inf', now)
if max_rate > 0 then
  local n = redis.call('INCR', rate)
  if n == 1 then
    redis.call('PEXPIRE', rate, window)
  end
  if n > max_rate then
    return 2
  end
end
if max_conns > 0 and redis.call('ZCARD', conns) >= max_conns then
  return 1
end
redis.call('ZADD', conns, now + ttl, id)
redis.call('PEXPIRE', conns, ttl)
return 0
