-- queue_join.lua: a user joins a campaign's waiting room, or asks again for their place.
-- Nothing is written before the refusals: a proof-of-work salt already used, a sold-out
-- campaign, a campaign without counters. Then, in order: a waiting user keeps their
-- place (a join counts as a poll), a user holding a pass keeps it, and anyone else gets
-- a new place. Places are numbers, admission goes lowest first:
--   fifo, or random from starts_at on: 2^40 + the join counter (arrival order; random
--     mode's late arrivals thus queue behind the whole pre-queue);
--   random before starts_at (the pre-queue): 1 + 40 bits of SHA-1(seed, user), the seed
--     drawn once by Redis (TIME and a gateway's random bytes). That is the shuffle: a
--     keyed permutation fixed before anyone could see it, revealed at starts_at (until
--     then no position is told), never redrawn by joining again, and costing nothing at
--     starts_at however long the pre-queue.
-- A newcomer further back than close_factor x available (once places are final) is told
-- closed at once, and remembered so.
--
-- KEYS[1] line zset      KEYS[2] seen zset     KEYS[3] members hash   KEYS[4] passes zset
-- KEYS[5] used zset      KEYS[6] closed set    KEYS[7] meta hash      KEYS[8] solved zset
-- KEYS[9] campaign state hash    KEYS[10] blocks hash
-- ARGV[1] user   ARGV[2] mode, "fifo" or "random"   ARGV[3] starts_at, ms (0: none)
-- ARGV[4] close_factor   ARGV[5] proof-of-work salt ("": none)   ARGV[6] its expiry, ms
-- ARGV[7] random hex from the gateway, mixed into the seed if this join draws it
-- returns {status, place, position, length, expires_ms, prequeue}
--   0 waiting: position 1-based (0 in the pre-queue: not told before the shuffle)
--   1 holds a pass: expires_ms    2 closed at once    3 salt already used
--   4 sold out                    5 no such campaign
--   prequeue: 1 while places are still secret (random mode before starts_at)

local line_key, seen_key, members_key, passes_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local used_key, closed_key, meta_key, solved_key, state_key =
  KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local blocks_key = KEYS[10]
local user, mode, starts_at = ARGV[1], ARGV[2], tonumber(ARGV[3])
local close_factor, salt, salt_expiry = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local entropy = ARGV[7]
if user == '' or (mode ~= 'fifo' and mode ~= 'random') or not starts_at or not close_factor
    or not salt_expiry then
  return redis.error_reply('queue_join: malformed call (see the argument list at the top)')
end

if salt ~= '' and redis.call('ZSCORE', solved_key, salt) then
  return {3, 0, 0, 0, 0, 0}
end
local available = redis.call('HGET', state_key, 'available')
if not available then
  return {5, 0, 0, 0, 0, 0}
end
available = tonumber(available)
if available <= 0 then
  return {4, 0, 0, 0, 0, 0}
end

local now = now_ms()
local shuffled = redis.call('HGET', meta_key, 'shuffled_ms')
local prequeue = mode == 'random' and starts_at > 0 and now < starts_at and not shuffled
local length = redis.call('ZCARD', line_key)

local function position(place)
  if prequeue then
    return 0
  end
  return redis.call('ZRANK', line_key, user) + 1
end

local place = redis.call('ZSCORE', line_key, user)
if place then
  if salt ~= '' then
    redis.call('ZADD', solved_key, salt_expiry, salt)
  end
  redis.call('ZADD', seen_key, now, user)
  return {0, place, position(place), length, 0, prequeue and 1 or 0}
end
for _, key in ipairs({passes_key, used_key}) do
  local expires = tonumber(redis.call('ZSCORE', key, user) or '0')
  if expires > now then
    if salt ~= '' then
      redis.call('ZADD', solved_key, salt_expiry, salt)
    end
    local member = redis.call('HGET', members_key, user) or '0:0'
    return {1, tonumber(string.match(member, '^([^:]+)')) or 0, 0, length, expires, 0}
  end
end

-- a new place
if salt ~= '' then
  redis.call('ZADD', solved_key, salt_expiry, salt)
end
local seq = redis.call('HINCRBY', meta_key, 'seq', 1)
if prequeue then
  local seed = redis.call('HGET', meta_key, 'seed')
  if not seed then
    local t = redis.call('TIME')
    seed = redis.sha1hex(t[1] .. '.' .. t[2] .. '.' .. entropy)
    redis.call('HSET', meta_key, 'seed', seed)
  end
  place = 1 + tonumber(string.sub(redis.sha1hex(seed .. '\n' .. user), 1, 10), 16)
else
  place = QUEUE_LATE + seq
end
redis.call('HSET', members_key, user, place .. ':' .. now)
if not prequeue and length >= math.floor(close_factor * available) then
  redis.call('SADD', closed_key, user)
  redis.call('HINCRBY', meta_key, 'closed', 1)
  return {2, place, length + 1, length, 0, 0}
end
redis.call('SREM', closed_key, user)
redis.call('ZADD', line_key, place, user)
redis.call('ZADD', seen_key, now, user)
queue_count(blocks_key, {place}, 1)
return {0, place, position(place), length + 1, 0, prequeue and 1 or 0}
