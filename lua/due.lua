-- due.lua: the reservations whose deadline has passed, by Redis's clock (never a
-- gateway's), for the sweeper to hand to release.lua one by one.
--
-- KEYS[1] deadlines zset
-- ARGV[1] at most this many ids
-- returns a list of reservation ids

return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
