-- queue_pass_use.lua: these users' passes bought (their reservations were made). A used
-- pass no longer counts against max_passes_per_unit x available, so its slot goes to
-- the next waiter; it stays good for the buyer's retries until it expires.
--
-- KEYS[1] passes zset   KEYS[2] used zset   KEYS[3] meta hash
-- ARGV[1 ...] users
-- returns how many passes moved (a pass already used or gone is left as it is)

local passes_key, used_key, meta_key = KEYS[1], KEYS[2], KEYS[3]
local moved = 0
for i = 1, #ARGV do
  local user = ARGV[i]
  local expires = redis.call('ZSCORE', passes_key, user)
  if expires then
    redis.call('ZREM', passes_key, user)
    redis.call('ZADD', used_key, expires, user)
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('HINCRBY', meta_key, 'used', moved)
end
return moved
