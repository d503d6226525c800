-- release.lua: give reservations' units back to stock and their quota back to their
-- users, each exactly once; a batch of them in one call (the releases of one
-- event-loop tick, or one sweep). Used when the backend refuses or fails, by the
-- dispatcher when it gives up (dead letter), by cancel (also of a committed sale: an
-- after-sale return), and by the sweepers when a deadline passes. After a release the
-- idempotency key is free for a fresh attempt.
--
-- A sweeper ("due") may find a sync reservation still unsettled: its gateway died
-- (or lost Redis) before the backend's answer, and only the backend knows whether
-- it took the order. If the record keeps its order (reserve.lua stores it with the
-- decision), it is not released but queued for redelivery: the dispatcher asks the
-- backend again (backends treat X-Reservation-Id as their idempotency key) and
-- settles it by the answer. One without an order goes back to stock. A queue-mode
-- order its gateway never handed over (hand_over.lua) is handed over instead.
--
-- KEYS[1] state hash   KEYS[2] users hash   KEYS[3] idempotency hash
-- KEYS[4] ledger stream   KEYS[5] deadlines zset   KEYS[6] orders stream
-- KEYS[7] dead letters stream   KEYS[7 + i] reservation record of item i
-- ARGV[1] actor   ARGV[2] ledger max length (0: no cap)   ARGV[3] events channel
-- ARGV[4 + 7 * (i - 1) ...] item i: reservation id; the states it may leave, comma
--   separated ("reserved,held,committed"); the state it enters ("released",
--   "expired" or "cancelled"); the reason; "due" to act only once its deadline has
--   passed; the order payload to keep in the dead letters ("" for no dead letter);
--   "tombstone": an undo (its requester never learnt the outcome). If there is no such
--   reservation, leave a released record for a day, so that the reserve call being
--   undone cannot make it should it arrive later; one a retry was told 202 for (and
--   handed over, hand_over.lua) is left to its delivery: 2
-- returns 2 values per item: status, state
--   0 released (state entered)      1 already back in stock (its state)
--   2 not allowed from its state    3 no such reservation      4 not due yet
--   5 queued for redelivery (or, queue mode, handed over to the dispatcher)

local state_key, users_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local ledger_key, deadlines_key = KEYS[4], KEYS[5]
local orders_key, dead_key = KEYS[6], KEYS[7]
local actor, ledger_max, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local count = (#ARGV - 3) / 7
if not ledger_max then
  return redis.error_reply('release: the ledger max length must be a number')
end
if count ~= math.floor(count) or #KEYS ~= 7 + count then
  return redis.error_reply('release: malformed call (see the argument list at the top)')
end
for i = 1, count do
  local target = ARGV[4 + 7 * (i - 1) + 2]
  if target ~= 'released' and target ~= 'expired' and target ~= 'cancelled' then
    return redis.error_reply('release: the state entered must be released, expired or cancelled')
  end
end

local figures = read_figures(state_key)
local available_at_start = figures and figures.available
local now = now_ms()
local changed = false

-- Nothing to give back: a record that is gone or was never made (an undo leaves a
-- tombstone so that the reserve call being undone cannot make it later).
local function absent(record_key, rid, target, reason, tombstone)
  redis.call('ZREM', deadlines_key, rid)
  if tombstone then
    redis.call('HSET', record_key, 'state', target, 'reason', reason, 'updated_ms', now)
    redis.call('PEXPIRE', record_key, 86400000)
  end
  return 3, ''
end

-- Due and unsettled with its order kept: delivered again instead of released.
local function redeliver(record_key, rid, record)
  local user, qty = record[2], tonumber(record[3])
  queue_kept_order(record_key, deadlines_key, orders_key, rid, record[6], now)
  if record[8] == 'queue' then -- never handed over: its gateway died before answering 202
    append_ledger(ledger_key, ledger_max, 'hand-over', rid, user, qty, actor, figures, figures,
                  'its gateway never handed it over: delivering it')
  else
    redis.call('HSET', record_key, 'mode', 'redelivery')
    append_ledger(ledger_key, ledger_max, 'redeliver', rid, user, qty, actor, figures, figures,
                  'unsettled at its deadline: asking the backend again')
  end
  return 5, record[1]
end

local function give_back(record_key, rid, record, target, reason, dead_payload)
  local state, user, qty, idem = record[1], record[2], tonumber(record[3]), record[4]
  local before = copy_figures(figures)
  figures.available = figures.available + qty
  if state == 'committed' then
    figures.sold = figures.sold - qty
  else
    figures.reserved = figures.reserved - qty
  end
  give_back_quota(users_key, user, qty)
  if idem ~= '' and redis.call('HGET', idem_key, idem) == rid then
    redis.call('HDEL', idem_key, idem)
  end
  redis.call('ZREM', deadlines_key, rid)
  -- 'left': the state it left (a late acceptance may take back a released or expired
  -- reservation, never a hold that expired unpaid); the kept order is not needed now.
  redis.call('HSET', record_key, 'state', target, 'reason', reason, 'updated_ms', now,
             'left', state, 'deadline_ms', 0)
  redis.call('HDEL', record_key, 'payload')
  count_move(state_key, state, target, 1)
  if dead_payload ~= '' then
    redis.call('XADD', dead_key, 'MAXLEN', '~', math.max(ledger_max, 1000), '*', 'rid', rid,
               'reason', reason, 'attempts', record[7] or '0', 'payload', dead_payload)
  end
  append_ledger(ledger_key, ledger_max, target, rid, user, qty, actor, before, figures, reason)
  changed = true
  return 0, target
end

local function release(record_key, rid, leavable, target, reason, only_when_due, dead_payload,
                       tombstone)
  local record = redis.call('HMGET', record_key, 'state', 'user', 'qty', 'idem', 'deadline_ms',
                            'payload', 'attempts', 'mode', 'told')
  local state, deadline, payload = record[1], tonumber(record[5]), record[6]
  if not state then
    return absent(record_key, rid, target, reason, tombstone)
  end
  if state == 'released' or state == 'expired' or state == 'cancelled' then
    redis.call('ZREM', deadlines_key, rid)
    return 1, state
  end
  if not listed(leavable, state) then
    if only_when_due and state == 'committed' then
      redis.call('ZREM', deadlines_key, rid) -- a stale deadline of a settled sale
    end
    return 2, state
  end
  if tombstone and state == 'reserved' and record[9] == '202' then
    return 2, state -- a retry was told 202 and handed it over: its delivery settles it
  end
  if only_when_due and (deadline == 0 or deadline > now) then
    return 4, state
  end
  if not figures then
    return 3, state
  end
  if only_when_due and state == 'reserved' and payload and payload ~= '' then
    return redeliver(record_key, rid, record)
  end
  return give_back(record_key, rid, record, target, reason, dead_payload)
end

local out = {}
for i = 1, count do
  local at = 4 + 7 * (i - 1)
  local status, state = release(KEYS[7 + i], ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
                                ARGV[at + 4] == 'due', ARGV[at + 5], ARGV[at + 6] == 'tombstone')
  out[#out + 1] = status
  out[#out + 1] = state
end
if changed then
  write_figures(state_key, figures)
  announce(channel, available_at_start, figures.available)
end
return out
