-- delivery_slot.lua: take or give back one of a campaign's delivery slots, so that
-- all dispatchers of all gateways together keep at most max_inflight requests in
-- flight to the backend: the peak shaving of queue mode. A slot whose holder died
-- frees itself after its ttl.
--
-- A delivery that timed out may still be running at the backend: "linger" gives its
-- slot back but keeps the place taken for ttl more, so that its retry (or another
-- order) does not go out on top of it.
--
-- KEYS[1] slots zset (holder -> expiry, ms)
-- ARGV[1] "take", "give" or "linger"   ARGV[2] holder   ARGV[3] max in flight
-- ARGV[4] ttl, ms (take, linger)
-- returns 1 when taken (or given back), 0 when every slot is busy, -1 when this holder
-- has a slot already (another dispatcher is delivering the same order right now)

local slots_key, how, holder = KEYS[1], ARGV[1], ARGV[2]
if how == 'give' or how == 'linger' then
  redis.call('ZREM', slots_key, holder)
  if how == 'linger' then
    local ttl = tonumber(ARGV[4])
    redis.call('ZADD', slots_key, now_ms() + ttl, holder .. '#late')
    if redis.call('PTTL', slots_key) < 2 * ttl then
      redis.call('PEXPIRE', slots_key, 2 * ttl)
    end
  end
  return 1
end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now)
if redis.call('ZSCORE', slots_key, holder) then
  return -1
end
if redis.call('ZCARD', slots_key) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', slots_key, now + tonumber(ARGV[4]), holder)
redis.call('PEXPIRE', slots_key, tonumber(ARGV[4]) * 2)
return 1
