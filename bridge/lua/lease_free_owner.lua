-- Free a domain lease held by this node before it restarted (compare and delete
-- by owner): its sessions died with it, so nobody else is collecting.
-- KEYS[1] lease STRING    bridge:{d}:lease
-- ARGV[1] owner prefix    '<node>#' (a token is '<node>#<random>')
-- Returns 1 when freed, 0 when the lease is absent or another node's.
local lease, prefix = KEYS[1], ARGV[1]
local token = redis.call('GET', lease)
if token and string.sub(token, 1, #prefix) == prefix then
  return redis.call('DEL', lease)
end
return 0
