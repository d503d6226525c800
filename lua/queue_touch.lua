-- queue_touch.lua: a gateway asks about waiters it has no recent word on (their first
-- poll there, a place that just left the line, a position near the closing boundary),
-- and tells Redis about the ones it told "closed". A waiter still in line is seen now
-- (the heartbeat that keeps the place); one told "closed" is closed here too, so that
-- every gateway says the same from then on; one further back than close_factor x
-- available (once places are final) is closed now. Everyone's state is returned. (The
-- heartbeats of waiters answered from memory go as one ZADD XX, not through here.)
--
-- KEYS[1] line zset   KEYS[2] seen zset   KEYS[3] members hash   KEYS[4] passes zset
-- KEYS[5] used zset   KEYS[6] closed set  KEYS[7] meta hash      KEYS[8] campaign state hash
-- KEYS[9] blocks hash
-- ARGV[1] mode, "fifo" or "random"   ARGV[2] close_factor
-- ARGV[3 + 2 * (i - 1)] user i   ARGV[4 + 2 * (i - 1)] what the gateway told them:
--   "" or "closed"
-- returns 4 values per user: state, place, position, expires_ms
--   0 waiting: position 1-based (0 in the pre-queue: not told before the shuffle)
--   1 holds an unused pass (expires_ms)   2 bought with it, still good for retries
--   3 closed   4 gone: lost the place (not seen for heartbeat, pass unused in time)
--     or never joined

local line_key, seen_key, members_key, passes_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local used_key, closed_key, meta_key, state_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local blocks_key = KEYS[9]
local mode, close_factor = ARGV[1], tonumber(ARGV[2])
local count = (#ARGV - 2) / 2
if (mode ~= 'fifo' and mode ~= 'random') or not close_factor or count ~= math.floor(count) then
  return redis.error_reply('queue_touch: malformed call (see the argument list at the top)')
end

local now = now_ms()
-- without counters (-1) nobody is closed here: that is no sell-out, but a Redis that lost them
local available = tonumber(redis.call('HGET', state_key, 'available') or '-1')
local final = mode == 'fifo' or redis.call('HEXISTS', meta_key, 'shuffled_ms') == 1
local boundary = math.floor(close_factor * available)
local closed_now = 0

local function member_place(user)
  local member = redis.call('HGET', members_key, user) or ''
  return tonumber(string.match(member, '^([^:]+)')) or 0
end

local function state_of(user, told)
  local place = redis.call('ZSCORE', line_key, user)
  if place then
    local rank = redis.call('ZRANK', line_key, user)
    if told == 'closed' or available == 0 or (final and available > 0 and rank >= boundary) then
      queue_leave(line_key, seen_key, blocks_key, {user})
      redis.call('SADD', closed_key, user)
      closed_now = closed_now + 1
      return 3, place, rank + 1, 0
    end
    redis.call('ZADD', seen_key, now, user)
    return 0, place, final and rank + 1 or 0, 0
  end
  local expires = tonumber(redis.call('ZSCORE', passes_key, user) or '0')
  if expires > now then
    return 1, member_place(user), 0, expires
  end
  expires = tonumber(redis.call('ZSCORE', used_key, user) or '0')
  if expires > now then
    return 2, member_place(user), 0, expires
  end
  if redis.call('SISMEMBER', closed_key, user) == 1 then
    return 3, member_place(user), 0, 0
  end
  return 4, member_place(user), 0, 0
end

local out = {}
for i = 1, count do
  local state, place, position, expires = state_of(ARGV[1 + 2 * i], ARGV[2 + 2 * i])
  out[#out + 1] = state
  out[#out + 1] = place
  out[#out + 1] = position
  out[#out + 1] = expires
end
if closed_now > 0 then
  redis.call('HINCRBY', meta_key, 'closed', closed_now)
end
return out
