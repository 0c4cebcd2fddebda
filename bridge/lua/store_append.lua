-- Add one piece of content to a message being written (redis store).
-- KEYS[1] incoming LIST   bridge:{d}:incoming:<qid>
-- ARGV[1] the piece (at most 256 KB)
-- ARGV[2] milliseconds the unfinished list may live (an interrupted write leaves nothing)
-- Returns the number of pieces now in the list.
local incoming = KEYS[1]
local piece, ttl_ms = ARGV[1], ARGV[2]
local count = redis.call('RPUSH', incoming, piece)
redis.call('PEXPIRE', incoming, ttl_ms)
return count
