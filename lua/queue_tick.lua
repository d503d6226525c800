-- queue_tick.lua: move a campaign's waiting room forward, and describe it. Every gateway
-- calls it a few times a second; whoever comes first after the view went stale does the
-- work, the others read that view (one computation per view_ttl however many gateways).
-- In order, by Redis's clock:
--   1. passes: expired ones go; while more are unused than max_passes_per_unit x
--      available, the newest are withdrawn and their holders go back to their place
--      (the front of the line); at sell-out every pass holder and waiter is closed;
--   2. waiters not seen for `heartbeat` lose their place (abandoned), unless these calls
--      themselves stopped for a while (see there);
--   3. random mode: the first call at or after starts_at marks the pre-queue shuffled
--      (its places were drawn at join, see queue_join.lua); positions are told from now;
--   4. waiters further back than close_factor x available are closed;
--   5. from starts_at on, passes go to the front of the line, as many as the token
--      bucket (admit_rate per second, empty at first) and the cap allow.
-- The view it returns lets a gateway answer polls from memory: the places of the first
-- 256 waiters, the waiters per block of places (any position within a block's count),
-- the passes issued and withdrawn lately, the cap and the totals. Every step works on
-- many users per command, so that a computation costs a few dozen commands, not one a
-- waiter (a poll's budget is a small fraction of one).
--
-- KEYS[1] line zset   KEYS[2] seen zset   KEYS[3] members hash   KEYS[4] passes zset
-- KEYS[5] used zset   KEYS[6] closed set  KEYS[7] meta hash      KEYS[8] bucket hash
-- KEYS[9] view string KEYS[10] withdrawn list   KEYS[11] solved zset
-- KEYS[12] campaign state hash   KEYS[13] blocks hash   KEYS[14] admitted list
-- ARGV[1] mode, "fifo" or "random"   ARGV[2] starts_at, ms (0: none)
-- ARGV[3] admit_rate, passes per second   ARGV[4] max_passes_per_unit
-- ARGV[5] close_factor   ARGV[6] pass_ttl, ms   ARGV[7] heartbeat, ms
-- ARGV[8] how long the view is shared, ms   ARGV[9] "force": compute even if shared
-- returns {view (JSON), computed (0: the shared one), now_ms, wait ms of each pass issued}

local line_key, seen_key, members_key, passes_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local used_key, closed_key, meta_key, bucket_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local view_key, withdrawn_key, solved_key, state_key = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local blocks_key, admitted_key = KEYS[13], KEYS[14]
local mode, starts_at, rate = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local per_unit, close_factor = tonumber(ARGV[4]), tonumber(ARGV[5])
local pass_ttl, heartbeat, view_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local force = ARGV[9] == 'force'
if (mode ~= 'fifo' and mode ~= 'random') or not starts_at or not rate or not per_unit
    or not close_factor or not pass_ttl or not heartbeat or not view_ttl then
  return redis.error_reply('queue_tick: malformed call (see the argument list at the top)')
end

local now = now_ms()
if not force then
  local shared = redis.call('GET', view_key)
  if shared then
    return {shared, 0, now}
  end
end

-- Work per call is bounded, so that a huge queue never blocks Redis for long.
-- (Lists of users go to a command at most 1,000 at a time, within Lua's unpack limit.)
local MAX_CLOSED, MAX_SWEPT, MAX_MOVED, EXACT, RECENT = 20000, 5000, 2000, 256, 100
-- The bucket holds half a second of passes at most: a burst after a pause stays small.
local BURST_SECONDS = 0.5
-- Passes issued lately, in the view: a second's worth (every gateway refreshes oftener).
local ADMITTED = math.min(1000, math.max(50, math.ceil(rate)))

local function each_chunk(list, fn)
  for i = 1, #list, 1000 do
    fn(unpack(list, i, math.min(i + 999, #list)))
  end
end

-- {user, score, user, score, ...} as two lists
local function split(flat)
  local users, scores = {}, {}
  for i = 1, #flat, 2 do
    users[#users + 1] = flat[i]
    scores[#scores + 1] = tonumber(flat[i + 1])
  end
  return users, scores
end

local available = redis.call('HGET', state_key, 'available')
if not available then
  local missing = cjson.encode({v = 1, missing = true, now = now})
  redis.call('SET', view_key, missing, 'PX', view_ttl)
  return {missing, 1, now}
end
available = tonumber(available)
local cap = math.floor(per_unit * available)
local closed, withdrawn, abandoned = 0, 0, 0

-- 1. passes
local expired = redis.call('ZREMRANGEBYSCORE', passes_key, '-inf', now)
redis.call('ZREMRANGEBYSCORE', used_key, '-inf', now)
local outstanding = redis.call('ZCARD', passes_key)
if available <= 0 and outstanding > 0 then
  local holders = redis.call('ZRANGE', passes_key, 0, -1)
  each_chunk(holders, function(...) redis.call('SADD', closed_key, ...) end)
  redis.call('DEL', passes_key)
  closed, outstanding = closed + #holders, 0
elseif outstanding > cap then
  -- beyond MAX_MOVED, the next call goes on (queue_pass_check.lua refuses them meanwhile)
  local users = split(redis.call('ZPOPMAX', passes_key, math.min(outstanding - cap, MAX_MOVED)))
  local members = redis.call('HMGET', members_key, unpack(users))
  local back, places = {}, {}
  for i, user in ipairs(users) do
    local place = tonumber(string.match(members[i] or '', '^([^:]+)')) or 0
    back[#back + 1] = place
    back[#back + 1] = user
    places[#places + 1] = place
  end
  redis.call('ZADD', line_key, unpack(back))
  local seen = {}
  for _, user in ipairs(users) do
    seen[#seen + 1] = now
    seen[#seen + 1] = user
  end
  redis.call('ZADD', seen_key, unpack(seen))
  queue_count(blocks_key, places, 1)
  redis.call('LPUSH', withdrawn_key, unpack(users))
  redis.call('LTRIM', withdrawn_key, 0, RECENT - 1)
  withdrawn, outstanding = #users, outstanding - #users
end

-- 2. abandoned. After a gap in these calls longer than half the heartbeat (Redis was
-- unreachable, or every gateway down), nobody could send a heartbeat: for one heartbeat
-- from then on nobody is dropped, so that waiters are not lost to the gateway's outage.
local last_tick = tonumber(redis.call('HGET', meta_key, 'tick_ms') or '0')
local grace = tonumber(redis.call('HGET', meta_key, 'grace_ms') or '0')
if last_tick > 0 and now - last_tick > heartbeat / 2 then
  grace = now + heartbeat
  redis.call('HSET', meta_key, 'grace_ms', grace)
end
redis.call('HSET', meta_key, 'tick_ms', now)
if now >= grace then
  local gone = redis.call('ZRANGEBYSCORE', seen_key, '-inf', now - heartbeat, 'LIMIT', 0,
                          MAX_SWEPT)
  if #gone > 0 then
    abandoned = #queue_leave(line_key, seen_key, blocks_key, gone)
  end
end

-- 3. the shuffle's instant
local started = starts_at == 0 or now >= starts_at
local shuffled = redis.call('HGET', meta_key, 'shuffled_ms')
local length = redis.call('ZCARD', line_key)
if mode == 'random' and started and not shuffled then
  shuffled = tostring(now)
  redis.call('HSET', meta_key, 'shuffled_ms', shuffled, 'prequeue', length)
end
local final = mode == 'fifo' or shuffled ~= false -- HGET's nil is Lua's false

-- 4. too far back (at sell-out: everyone)
local boundary = math.floor(close_factor * math.max(available, 0))
if (final or available <= 0) and length > boundary then
  local users, places = split(redis.call('ZRANGE', line_key, boundary,
                                         boundary + MAX_CLOSED - 1, 'WITHSCORES'))
  each_chunk(users, function(...)
    redis.call('SADD', closed_key, ...)
    redis.call('ZREM', seen_key, ...)
  end)
  redis.call('ZREMRANGEBYRANK', line_key, boundary, boundary + #users - 1)
  queue_count(blocks_key, places, -1)
  closed, length = closed + #users, length - #users
end

-- 5. admission
local waits = {}
local want = math.min(cap - outstanding, length, MAX_MOVED)
if started and final and available > 0 and want > 0 then
  if redis.call('EXISTS', bucket_key) == 0 then
    redis.call('HSET', bucket_key, 'tokens', 0, 'ms', now) -- admission starts with none
  end
  local granted = take_from_bucket(bucket_key, now, rate, math.max(1, rate * BURST_SECONDS), want)
  if granted > 0 then
    local users, places = split(redis.call('ZPOPMIN', line_key, granted))
    local expires = now + pass_ttl
    local passes, entries = {}, {}
    for _, user in ipairs(users) do
      passes[#passes + 1] = expires
      passes[#passes + 1] = user
      entries[#entries + 1] = user .. ' ' .. expires
    end
    redis.call('ZREM', seen_key, unpack(users))
    redis.call('ZADD', passes_key, unpack(passes))
    queue_count(blocks_key, places, -1)
    redis.call('LPUSH', admitted_key, unpack(entries))
    redis.call('LTRIM', admitted_key, 0, ADMITTED - 1)
    local members = redis.call('HMGET', members_key, unpack(users))
    for i = 1, #users do
      local joined = tonumber(string.match(members[i] or '', ':(%d+)$'))
      waits[#waits + 1] = now - (joined or now)
    end
    outstanding, length = outstanding + #users, length - #users
    redis.call('HINCRBY', meta_key, 'issued', #users)
  end
end

-- the totals that moved
for name, n in pairs({expired = expired, closed = closed, withdrawn = withdrawn,
                      abandoned = abandoned}) do
  if n > 0 then
    redis.call('HINCRBY', meta_key, name, n)
  end
end

-- the view
local first = {}
local front = redis.call('ZRANGE', line_key, 0, EXACT - 1, 'WITHSCORES')
for i = 2, #front, 2 do
  first[#first + 1] = tonumber(front[i])
end
local meta = redis.call('HMGET', meta_key, 'seq', 'issued', 'expired', 'withdrawn', 'closed',
                        'abandoned', 'used', 'prequeue')
local view = {
  v = 1, now = now, available = available, length = length, final = final,
  started = started, cap = cap, boundary = boundary, outstanding = outstanding,
  holding_used = redis.call('ZCARD', used_key), front = first,
  blocks = redis.call('HGETALL', blocks_key),
  joined = tonumber(meta[1] or '0'), issued = tonumber(meta[2] or '0'),
  expired = tonumber(meta[3] or '0'), withdrawn = tonumber(meta[4] or '0'),
  closed = tonumber(meta[5] or '0'), abandoned = tonumber(meta[6] or '0'),
  used = tonumber(meta[7] or '0'), prequeue = tonumber(meta[8] or '0'),
  shuffled_ms = tonumber(shuffled or '0'),
  recently_withdrawn = redis.call('LRANGE', withdrawn_key, 0, RECENT - 1),
  recently_admitted = redis.call('LRANGE', admitted_key, 0, ADMITTED - 1),
}
-- salts of challenges used are remembered until they expire
redis.call('ZREMRANGEBYSCORE', solved_key, '-inf', now)
local encoded = cjson.encode(view)
redis.call('SET', view_key, encoded, 'PX', view_ttl)
local out = {encoded, 1, now}
for _, wait in ipairs(waits) do
  out[#out + 1] = wait
end
return out
