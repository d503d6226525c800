-- heartbeat.lua: say this gateway process is alive, forget the silent ones, and
-- count the living (by Redis's clock). Limits shared through Redis fall back to
-- 1/count of their rate per process while Redis is unreachable.
--
-- KEYS[1] processes zset (member -> last heartbeat, ms)
-- ARGV[1] this process   ARGV[2] silence after which a process counts as dead, ms
-- returns the number of live processes

local now = now_ms()
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
