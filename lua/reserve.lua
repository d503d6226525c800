-- reserve.lua: decide a batch of purchase attempts for one campaign, atomically.
-- For each attempt, in order: a repeated call, the idempotency key, the per-user
-- limit, the stock. A winner gets its units deducted, its quota counted, a
-- reservation record (with its order), an index entry, a deadline and a ledger entry.
-- Several attempts per call is what lets a gateway process decide a whole event-loop
-- tick of requests in one round trip. The order kept on the record is what no crash
-- can lose: sync mode forwards it, and delivers it again from here if its gateway dies
-- (release.lua); queue mode moves it to the orders stream when the gateway hands it
-- over as it answers 202 (hand_over.lua), or at the deadline if the gateway died. A
-- call Redis runs after its gateway gave up (the buyer was told 503) is never handed
-- over: the gateway's undo gives it back before anyone delivers it.
--
-- KEYS[1] state hash       KEYS[2] users hash        KEYS[3] idempotency hash
-- KEYS[4] ledger stream    KEYS[5] index zset        KEYS[6] deadlines zset
-- KEYS[6 + i] reservation record of attempt i
-- ARGV[1] per-user limit in units         ARGV[2] deadline after reserving, ms (0: none)
-- ARGV[3] ledger max length (0: no cap)   ARGV[4] mode, "sync", "queue" or "cart" (an
--   item of an order of several items: its order's record keeps the order and the
--   deadline, and decides its fate; see cart_open.lua)   ARGV[5] events channel
-- ARGV[6 + 6 * (i - 1) ...] attempt i: reservation id, user id, quantity,
--   idempotency field ("" for none), the order for the backend (kept on the record;
--   an item of a cart: the id of its cart's order, kept as 'cart'),
--   the request's fingerprint ("" for none): kept on the record with the key's binding,
--   so that a retry with the key can be told apart from another request reusing it
-- returns 3 values per attempt: status, reservation id, a figure
--   0 reserved (figure: available after)     1 duplicate (id of the earlier reservation)
--   2 sold out                              3 insufficient stock (figure: available)
--   4 limit exceeded (figure: units held)   5 no such campaign

local state_key, users_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local ledger_key, index_key, deadlines_key = KEYS[4], KEYS[5], KEYS[6]
local user_limit = tonumber(ARGV[1])
local deadline_after = tonumber(ARGV[2])
local ledger_max = tonumber(ARGV[3])
local mode = ARGV[4]
local channel = ARGV[5]
local count = (#ARGV - 5) / 6

-- Refuse the whole batch before writing anything: a script error does not roll back.
if not user_limit or not deadline_after or not ledger_max or not listed('sync,queue,cart', mode)
    or count ~= math.floor(count) or #KEYS ~= 6 + count then
  return redis.error_reply('reserve: malformed call (see the argument list at the top)')
end
for i = 1, count do
  local qty = tonumber(ARGV[6 + 6 * (i - 1) + 2])
  if not qty or qty < 1 or qty ~= math.floor(qty) then
    return redis.error_reply('reserve: quantity must be a positive integer')
  end
end

local out = {}
local figures = read_figures(state_key)
if not figures then
  for i = 1, count do
    out[#out + 1] = 5
    out[#out + 1] = ARGV[6 + 6 * (i - 1)]
    out[#out + 1] = 0
  end
  return out
end

local now = now_ms()
local available_at_start = figures.available
local winners, repeats = 0, 0

local function reserve(record_key, rid, user, qty, idem, payload, fingerprint)
  local before = copy_figures(figures)
  figures.available = figures.available - qty
  figures.reserved = figures.reserved + qty
  redis.call('HINCRBY', users_key, user, qty)
  local deadline = 0
  if deadline_after > 0 then
    deadline = now + deadline_after
    redis.call('ZADD', deadlines_key, deadline, rid)
  end
  redis.call('HSET', record_key, 'user', user, 'qty', qty, 'state', 'reserved',
             'mode', mode, 'idem', idem, 'created_ms', now, 'updated_ms', now,
             'deadline_ms', deadline, 'attempts', 0)
  redis.call('ZADD', index_key, now, rid)
  if mode == 'cart' then
    redis.call('HSET', record_key, 'cart', payload)
  elseif payload ~= '' then
    -- what will be sent to the backend, kept in the same step: should this gateway die
    -- before the backend's answer, a sweeper delivers it instead of guessing
    redis.call('HSET', record_key, 'payload', payload)
  end
  if idem ~= '' then
    redis.call('HSET', idem_key, idem, rid)
    if fingerprint ~= '' then
      redis.call('HSET', record_key, 'fp', fingerprint)
    end
  end
  append_ledger(ledger_key, ledger_max, 'reserve', rid, user, qty, 'gateway', before, figures)
end

local function decide(record_key, rid, user, qty, idem, payload, fingerprint)
  local earlier_state = redis.call('HGET', record_key, 'state')
  if earlier_state then -- an id already used: a caller repeating a call never deducts twice
    repeats = repeats + 1
    return earlier_state == 'reserved' and 0 or 1, rid, figures.available
  end
  if idem ~= '' then
    local earlier = redis.call('HGET', idem_key, idem)
    if earlier then
      return 1, earlier, figures.available
    end
  end
  local held = tonumber(redis.call('HGET', users_key, user) or '0')
  if held + qty > user_limit then
    return 4, rid, held
  end
  if figures.available == 0 then
    return 2, rid, 0
  end
  if figures.available < qty then
    return 3, rid, figures.available
  end
  reserve(record_key, rid, user, qty, idem, payload, fingerprint)
  winners = winners + 1
  return 0, rid, figures.available
end

for i = 1, count do
  local at = 6 + 6 * (i - 1)
  local status, rid, figure = decide(KEYS[6 + i], ARGV[at], ARGV[at + 1],
                                     tonumber(ARGV[at + 2]), ARGV[at + 3], ARGV[at + 4],
                                     ARGV[at + 5])
  out[#out + 1] = status
  out[#out + 1] = rid
  out[#out + 1] = figure
end

if figures.available ~= available_at_start then
  write_figures(state_key, figures)
  count_move(state_key, nil, 'reserved', winners)
  -- new holders: the gateways that answer a sold-out campaign's keyed requests from
  -- memory read this to know their set of holders is out of date
  redis.call('HINCRBY', state_key, 'holders_v', 1)
  announce(channel, available_at_start, figures.available)
  if deadline_after > 0 then
    announce_due(state_key, channel, now + deadline_after, now)
  end
end
-- attempts decided (repeats not counted): the campaign view's "decided", against
-- which the admission budget's shadow-mode refusals are measured
redis.call('HINCRBY', state_key, 'decided', count - repeats)
return out
