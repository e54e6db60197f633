-- load_finish: publish a loaded job state by writing its counters and ready = "1" (last, atomically).
--
-- KEYS[1] pending SET, KEYS[2] failed SET, KEYS[3] counts HASH
-- ARGV[1] TTL seconds, ARGV[2] total, ARGV[3] captures, ARGV[4] detections, ARGV[5] classifications
-- Returns the number of pending ids.

redis.call('HSET', KEYS[3], 'total', ARGV[2], 'captures', ARGV[3], 'detections', ARGV[4],
           'classifications', ARGV[5], 'ready', '1')
local ttl = tonumber(ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return redis.call('SCARD', KEYS[1])
