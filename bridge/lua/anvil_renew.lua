-- Push the deadlines of a node's live connections from one address forward.
-- KEYS[1] conns  ZSET  bridge:anvil:{<ip>}:conns  connection id -> deadline (ms, Redis time)
-- ARGV[1] ttl    ms from now
-- ARGV[2..] ids  the node's connections from that address that are still open
local conns, ttl = KEYS[1], tonumber(ARGV[1])
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
for i = 2, #ARGV do
  redis.call('ZADD', conns, 'XX', deadline, ARGV[i])
end
redis.call('PEXPIRE', conns, ttl)
return 0
