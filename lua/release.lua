-- release.lua: give a reservation's units back to stock and its quota back to its
-- user, exactly once. Used when the backend refuses or fails, by the dispatcher when
-- it gives up (dead letter), by cancel (also of a committed sale: an after-sale
-- return), and by the sweepers when a deadline passes. After a release the
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
-- KEYS[4] ledger stream   KEYS[5] deadlines zset   KEYS[6] reservation record
-- KEYS[7] orders stream   KEYS[8] dead letters stream
-- ARGV[1] reservation id
-- ARGV[2] states it may leave, comma separated ("reserved,held,committed")
-- ARGV[3] state it enters: "released", "expired" or "cancelled"
-- ARGV[4] reason   ARGV[5] actor   ARGV[6] ledger max length (0: no cap)
-- ARGV[7] events channel   ARGV[8] "due" to act only once its deadline has passed
-- ARGV[9] order payload to keep in the dead letters ("" for no dead letter)
-- ARGV[10] "tombstone": an undo (its requester never learnt the outcome). If there is no
--   such reservation, leave a released record for a day, so that the reserve call being
--   undone cannot make it should it arrive later; one a retry was told 202 for (and
--   handed over, hand_over.lua) is left to its delivery: 2
-- returns {status, state}
--   0 released (state entered)      1 already back in stock (its state)
--   2 not allowed from its state    3 no such reservation      4 not due yet
--   5 queued for redelivery (or, queue mode, handed over to the dispatcher)

local state_key, users_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local ledger_key, deadlines_key, record_key = KEYS[4], KEYS[5], KEYS[6]
local orders_key, dead_key = KEYS[7], KEYS[8]
local rid, leavable, target = ARGV[1], ARGV[2], ARGV[3]
local reason, actor, ledger_max, channel = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local only_when_due, dead_payload, tombstone = ARGV[8] == 'due', ARGV[9], ARGV[10] == 'tombstone'
if target ~= 'released' and target ~= 'expired' and target ~= 'cancelled' then
  return redis.error_reply('release: the state entered must be released, expired or cancelled')
end
if not ledger_max then
  return redis.error_reply('release: the ledger max length must be a number')
end

local record = redis.call('HMGET', record_key, 'state', 'user', 'qty', 'idem', 'deadline_ms',
                          'payload', 'attempts', 'mode', 'told')
local state, user, qty, idem = record[1], record[2], tonumber(record[3]), record[4]
local deadline, payload = tonumber(record[5]), record[6]
if not state then
  redis.call('ZREM', deadlines_key, rid)
  if tombstone then
    redis.call('HSET', record_key, 'state', target, 'reason', reason, 'updated_ms', now_ms())
    redis.call('PEXPIRE', record_key, 86400000)
  end
  return {3, ''}
end
if state == 'released' or state == 'expired' or state == 'cancelled' then
  redis.call('ZREM', deadlines_key, rid)
  return {1, state}
end
if not listed(leavable, state) then
  if only_when_due and state == 'committed' then
    redis.call('ZREM', deadlines_key, rid) -- a stale deadline of a settled sale
  end
  return {2, state}
end
if tombstone and state == 'reserved' and record[9] == '202' then
  return {2, state} -- a retry was told 202 and handed it over: its delivery settles it
end
local now = now_ms()
if only_when_due and (deadline == 0 or deadline > now) then
  return {4, state}
end

local figures = read_figures(state_key)
if not figures then
  return {3, state}
end

if only_when_due and state == 'reserved' and payload and payload ~= '' then
  queue_kept_order(record_key, deadlines_key, orders_key, rid, payload, now)
  if record[8] == 'queue' then -- never handed over: its gateway died before answering 202
    append_ledger(ledger_key, ledger_max, 'hand-over', rid, user, qty, actor, figures, figures,
                  'its gateway never handed it over: delivering it')
  else
    redis.call('HSET', record_key, 'mode', 'redelivery')
    append_ledger(ledger_key, ledger_max, 'redeliver', rid, user, qty, actor, figures, figures,
                  'unsettled at its deadline: asking the backend again')
  end
  return {5, state}
end

local before = copy_figures(figures)
figures.available = figures.available + qty
if state == 'committed' then
  figures.sold = figures.sold - qty
else
  figures.reserved = figures.reserved - qty
end
write_figures(state_key, figures)
give_back_quota(users_key, user, qty)
if idem ~= '' and redis.call('HGET', idem_key, idem) == rid then
  redis.call('HDEL', idem_key, idem)
end
redis.call('ZREM', deadlines_key, rid)
-- 'left': the state it left (a late acceptance may take back a released or expired
-- reservation, never a hold that expired unpaid); the kept order is not needed now.
redis.call('HSET', record_key, 'state', target, 'reason', reason, 'updated_ms', now, 'left', state,
           'deadline_ms', 0)
redis.call('HDEL', record_key, 'payload')
count_move(state_key, state, target, 1)
if dead_payload ~= '' then
  redis.call('XADD', dead_key, 'MAXLEN', '~', math.max(ledger_max, 1000), '*', 'rid', rid,
             'reason', reason, 'attempts', record[7] or '0', 'payload', dead_payload)
end
append_ledger(ledger_key, ledger_max, target, rid, user, qty, actor, before, figures, reason)
announce(channel, before.available, figures.available)
return {0, target}
