-- record_outcomes: the atomic per-image gate (invariant 2).
--
-- For each image: remove its id from the pending set; only if that removal happened now, mark it failed
-- (when it failed) and add its captures/detections/classifications to the job's counters. All of it is
-- one atomic step, so no replay inflates a counter and no crash between two writes loses one.
--
-- An outcome that supersedes a "lost" verdict (a valid result that arrived after its image was failed
-- as lost) is gated on removing the id from the failed set instead: it is counted once, as processed.
--
-- KEYS[1]  pending SET   (ids whose outcome is not counted yet)
-- KEYS[2]  failed SET    (ids counted as failed)
-- KEYS[3]  counts HASH   (total, captures, detections, classifications, ready)
-- ARGV[1]  TTL in seconds applied to the three keys
-- ARGV[2]  JSON array of outcomes, each [image_id, failed (0|1), captures, detections, classifications,
--          supersedes (0|1)] (one argument: packing thousands of arguments cost the client more than the
--          script costs the server)
--
-- Returns {-1} when the state is missing (counts.ready ~= "1"); otherwise
-- {1, total, remaining, failed, captures, detections, classifications, newly_counted_id...}.

local pending, failed, counts = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HGET', counts, 'ready') ~= '1' then
  return {-1}
end

local newly = {}
local add_captures, add_detections, add_classifications = 0, 0, 0
for _, outcome in ipairs(cjson.decode(ARGV[2])) do
  local image_id = outcome[1]
  local counted
  if outcome[6] == 1 then
    counted = redis.call('SREM', failed, image_id) == 1
  else
    counted = redis.call('SREM', pending, image_id) == 1
    if counted and outcome[2] == 1 then
      redis.call('SADD', failed, image_id)
    end
  end
  if counted then
    add_captures = add_captures + outcome[3]
    add_detections = add_detections + outcome[4]
    add_classifications = add_classifications + outcome[5]
    newly[#newly + 1] = image_id
  end
end

if add_captures ~= 0 then redis.call('HINCRBY', counts, 'captures', add_captures) end
if add_detections ~= 0 then redis.call('HINCRBY', counts, 'detections', add_detections) end
if add_classifications ~= 0 then redis.call('HINCRBY', counts, 'classifications', add_classifications) end

local ttl = tonumber(ARGV[1])
redis.call('EXPIRE', pending, ttl)
redis.call('EXPIRE', failed, ttl)
redis.call('EXPIRE', counts, ttl)

local c = redis.call('HMGET', counts, 'total', 'captures', 'detections', 'classifications')
local result = {1, tonumber(c[1]) or 0, redis.call('SCARD', pending), redis.call('SCARD', failed),
                tonumber(c[2]) or 0, tonumber(c[3]) or 0, tonumber(c[4]) or 0}
for _, image_id in ipairs(newly) do
  result[#result + 1] = image_id
end
return result
