-- _prelude.lua: helpers that limiter/scripts.py puts in front of every script.
-- A campaign's counters live in one hash; a ledger entry records them before and after.

-- How notices are published: limiter/scripts.py makes it SPUBLISH on a Redis Cluster,
-- where a notice then stays within the shard that owns the campaign's slot.
local PUBLISH = 'PUBLISH'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The four counters of a campaign, or nil when the campaign does not exist.
local function read_figures(state_key)
  local v = redis.call('HMGET', state_key, 'available', 'reserved', 'sold', 'stock_total')
  if not v[1] then
    return nil
  end
  return {available = tonumber(v[1]), reserved = tonumber(v[2]),
          sold = tonumber(v[3]), total = tonumber(v[4])}
end

local function write_figures(state_key, f)
  redis.call('HSET', state_key, 'available', f.available, 'reserved', f.reserved,
             'sold', f.sold, 'stock_total', f.total)
end

local function copy_figures(f)
  return {available = f.available, reserved = f.reserved, sold = f.sold, total = f.total}
end

-- "available/reserved/sold/stock_total", the ledger's before and after columns.
local function figures_text(f)
  return string.format('%d/%d/%d/%d', f.available, f.reserved, f.sold, f.total)
end

-- Append an entry to a ledger stream, trimmed to about `max_len` (0: no cap); `why`
-- (optional) says what caused it.
local function add_ledger_entry(ledger_key, max_len, fields, why)
  if why and why ~= '' then
    fields[#fields + 1] = 'why'
    fields[#fields + 1] = why
  end
  if max_len > 0 then
    redis.call('XADD', ledger_key, 'MAXLEN', '~', max_len, '*', unpack(fields))
  else
    redis.call('XADD', ledger_key, '*', unpack(fields))
  end
end

-- `why` (optional) says what caused a release: an upstream status, a deadline, ...
local function append_ledger(ledger_key, max_len, op, rid, user, qty, actor, before, after, why)
  local fields = {'op', op, 'rid', rid, 'user', user, 'qty', qty, 'by', actor,
                  'before', figures_text(before), 'after', figures_text(after)}
  add_ledger_entry(ledger_key, max_len, fields, why)
end

-- A cart's ledger entry: what happened to one order of several items (the units are
-- in each item's campaign's own ledger).
local function append_cart_ledger(ledger_key, max_len, op, id, user, items, actor, why)
  local fields = {'op', op, 'rid', id, 'user', user, 'items', items, 'by', actor}
  add_ledger_entry(ledger_key, max_len, fields, why)
end

-- Tell every gateway when a campaign sells out or gets stock back.
local function announce(channel, available_before, available_after)
  if available_before > 0 and available_after == 0 then
    redis.call(PUBLISH, channel, 'sold-out')
  elseif available_before == 0 and available_after > 0 then
    redis.call(PUBLISH, channel, 'restock')
  end
end

-- Tell the gateways' sweepers when a deadline falls due, once per stretch: when the
-- moment last announced has passed (the sweepers then read the next deadline
-- themselves, after sweeping), or when this deadline comes sooner.
local function announce_due(state_key, channel, deadline, now)
  local announced = tonumber(redis.call('HGET', state_key, 'due_at') or '0')
  if announced <= now or deadline < announced then
    redis.call('HSET', state_key, 'due_at', deadline)
    redis.call(PUBLISH, channel, 'due ' .. deadline)
  end
end

local function give_back_quota(users_key, user, qty)
  if redis.call('HINCRBY', users_key, user, -qty) <= 0 then
    redis.call('HDEL', users_key, user)
  end
end

local function listed(list, item)
  return string.find(',' .. list .. ',', ',' .. item .. ',', 1, true) ~= nil
end

-- Take up to `want` tokens from a token bucket hash {tokens, ms}, refilled at `rate`
-- tokens per second up to `capacity`, by Redis's clock. Returns granted, wait_ms:
-- when fewer than wanted were granted, the ms until the next whole token (-1: never);
-- and the whole tokens left (the RateLimit header fields' "remaining").
local function take_from_bucket(key, now, rate, capacity, want)
  local b = redis.call('HMGET', key, 'tokens', 'ms')
  local tokens = tonumber(b[1]) or capacity
  local last = tonumber(b[2]) or now
  if now > last then
    tokens = tokens + (now - last) * rate / 1000
  end
  tokens = math.min(tokens, capacity)
  local granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
  redis.call('HSET', key, 'tokens', tokens, 'ms', now)
  local wait = 0
  if rate <= 0 then
    wait = -1
    redis.call('PEXPIRE', key, 60000)
  else
    -- an idle bucket refills completely: it may vanish and come back full
    redis.call('PEXPIRE', key, math.ceil(capacity / rate * 1000) + 1000)
    if granted < want then
      wait = math.ceil((1 - tokens) * 1000 / rate)
    end
  end
  return granted, wait, math.floor(tokens)
end

-- Reservations by state ("n:reserved", "n:held", ...) kept beside the counters, for
-- the metrics; `from` is nil for a new reservation.
local function count_move(state_key, from, to, n)
  if from then
    redis.call('HINCRBY', state_key, 'n:' .. from, -n)
  end
  redis.call('HINCRBY', state_key, 'n:' .. to, n)
end

-- A reservation's kept order goes to the orders stream for the dispatchers: its
-- forward deadline is done with, and the stream carries the order from now on (the
-- gateway's hand-over in queue mode, or the sweeper's when a gateway died).
local function queue_kept_order(record_key, deadlines_key, orders_key, rid, payload, now)
  redis.call('ZREM', deadlines_key, rid)
  redis.call('XADD', orders_key, '*', 'rid', rid, 'payload', payload)
  redis.call('HSET', record_key, 'deadline_ms', 0, 'updated_ms', now)
  redis.call('HDEL', record_key, 'payload')
end

-- Stream ids "ms-seq" as two numbers, to compare them (Lua's doubles hold both exactly).
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms) or 0, tonumber(seq) or 0
end

local function id_after(a, b)
  local a_ms, a_seq = id_parts(a)
  local b_ms, b_seq = id_parts(b)
  return a_ms > b_ms or (a_ms == b_ms and a_seq > b_seq)
end

-- Where the ledger stands: how many entries were ever added to it (-1 before Redis 7.0,
-- which does not say), the id of the last one ("0-0" before the first), and whether
-- every entry after a reader's position is still there. A position is an entry's id
-- and how many entries had been added up to it (its seq). The ledger is only ever
-- trimmed from its oldest end, so nothing after the position is gone while fewer
-- entries than its seq have left it (and none after it was deleted by hand); a ledger
-- deleted and made anew has had fewer than its seq. Before Redis 7.0: while the
-- oldest entry left is not after the position.
local function ledger_stand(ledger_key, position, seq)
  if redis.call('EXISTS', ledger_key) == 0 then
    return 0, '0-0', position == '0-0'
  end
  local info = redis.call('XINFO', 'STREAM', ledger_key)
  local s = {}
  for i = 1, #info, 2 do
    s[info[i]] = info[i + 1]
  end
  local added, length = tonumber(s['entries-added']), tonumber(s['length'])
  if not added then
    local first = s['first-entry']
    return -1, s['last-generated-id'],
      position == '0-0' or not first or not id_after(first[1], position)
  end
  local intact = added >= seq and added - length <= seq
    and not id_after(s['max-deleted-entry-id'] or '0-0', position)
  return added, s['last-generated-id'], intact
end

-- The entries after `position`, at most `limit`: id, op, rid, user, qty of each, in one
-- flat list (what a reader needs to know which reservations and users they moved).
local function ledger_since(ledger_key, position, limit)
  local out = {}
  if limit <= 0 then
    return out
  end
  for _, entry in ipairs(redis.call('XRANGE', ledger_key, '(' .. position, '+', 'COUNT', limit)) do
    local f, fields = {}, entry[2]
    for i = 1, #fields, 2 do
      f[fields[i]] = fields[i + 1]
    end
    out[#out + 1] = entry[1]
    out[#out + 1] = f.op or ''
    out[#out + 1] = f.rid or ''
    out[#out + 1] = f.user or ''
    out[#out + 1] = f.qty or '0'
  end
  return out
end

-- Whether an entry in a flat list from ledger_since is a repair or an init: what a reader
-- knew before it does not hold after it (a repair rewrites quotas and counts at once).
local function resets(entries)
  for i = 2, #entries, 5 do
    if entries[i] == 'repair' or entries[i] == 'init' then
      return true
    end
  end
  return false
end

-- Waiting rooms: the places in a line are counted per block in a hash beside it, by
-- every script that adds or removes a waiter, so that a view can tell any position
-- (within a block's count) in one HGETALL instead of a command per sampled rank.
-- Arrival places (2^40 + the join counter) go 256 to a block; the random pre-queue's
-- places (below 2^40) into 4,096 blocks of 2^28.
local QUEUE_LATE = 1099511627776

local function queue_block(place)
  if place >= QUEUE_LATE then
    return 'l' .. math.floor((place - QUEUE_LATE) / 256)
  end
  return 'p' .. math.floor(place / 268435456)
end

-- Count each place of `places` (numbers) into its block, `sign` 1 (joined) or -1 (left).
local function queue_count(blocks_key, places, sign)
  local by = {}
  for _, place in ipairs(places) do
    local block = queue_block(place)
    by[block] = (by[block] or 0) + sign
  end
  for block, n in pairs(by) do
    if redis.call('HINCRBY', blocks_key, block, n) <= 0 then
      redis.call('HDEL', blocks_key, block)
    end
  end
end

-- Remove `users` from a line (and their heartbeats), counting the blocks they leave;
-- returns the places of those that were in it.
local function queue_leave(line_key, seen_key, blocks_key, users)
  local places = {}
  for i = 1, #users, 1000 do
    local chunk = {unpack(users, i, math.min(i + 999, #users))}
    local scores = redis.call('ZMSCORE', line_key, unpack(chunk))
    redis.call('ZREM', line_key, unpack(chunk))
    redis.call('ZREM', seen_key, unpack(chunk))
    for _, score in ipairs(scores) do
      if score then
        places[#places + 1] = tonumber(score)
      end
    end
  end
  queue_count(blocks_key, places, -1)
  return places
end
