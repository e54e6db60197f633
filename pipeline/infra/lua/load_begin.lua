-- load_begin: start (re)loading a job's state, unless a complete state is already there.
--
-- A retried run_job must not reset progress: once counts.ready is "1" this is a no-op returning 0.
-- Otherwise any partial state left by a crash mid-load is wiped and 1 is returned; the caller then adds
-- the pending (and failed) ids in chunks and calls load_finish, which sets ready = "1" last.
--
-- KEYS[1] pending SET, KEYS[2] failed SET, KEYS[3] counts HASH
-- ARGV[1] "force" to reload even over a complete state (rebuild from the database), else ""
-- Returns 1 when the caller must load, 0 when the state is already complete.

if ARGV[1] ~= 'force' and redis.call('HGET', KEYS[3], 'ready') == '1' then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
