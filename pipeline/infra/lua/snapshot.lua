-- snapshot: read a job's counters without changing anything.
--
-- KEYS[1] pending SET, KEYS[2] failed SET, KEYS[3] counts HASH
-- Returns {-1} when the state is missing, else {1, total, remaining, failed, captures, detections,
-- classifications}.

local pending, failed, counts = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HGET', counts, 'ready') ~= '1' then
  return {-1}
end
local c = redis.call('HMGET', counts, 'total', 'captures', 'detections', 'classifications')
return {1, tonumber(c[1]) or 0, redis.call('SCARD', pending), redis.call('SCARD', failed),
        tonumber(c[2]) or 0, tonumber(c[3]) or 0, tonumber(c[4]) or 0}
