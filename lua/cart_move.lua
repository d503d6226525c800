-- cart_move.lua: an order of several items (a cart) changes state, atomically and once.
-- The order's state is the decision for every item; the items' own records (in their
-- campaigns, other slots) follow it afterwards, "applied" by whoever moved it, and by
-- a sweeper should that one die: a move that the items must follow leaves applied 0
-- and a short deadline, and cart_settled.lua clears both once they have.
--
--   reserving -> reserved     every item reserved (queue mode: handed over at once)
--   reserving -> released     an item could not be had, or the deadline passed
--   reserved  -> reserved     handed over to the dispatchers ("hand-over"): queue mode
--                             never handed over, or sync mode unsettled at its deadline
--   reserved  -> committed | held | released   the backend's answer
--   held      -> committed    confirmed (paid) before the hold ran out
--   held      -> expired      the hold ran out ("due")
--   any live  -> cancelled    an operator's cancel (also of a committed sale)
-- Entering released, expired or cancelled frees the order's Idempotency-Key.
--
-- KEYS[1] meta hash   KEYS[2] idempotency hash   KEYS[3] deadlines zset
-- KEYS[4] ledger stream   KEYS[5] orders stream   KEYS[6] dead letters stream
-- KEYS[7] the order's record
-- ARGV[1] order id   ARGV[2] the states it may leave, comma separated
-- ARGV[3] the state it enters   ARGV[4] "due": only once its deadline (a hold: the
--   hold's end) has passed   ARGV[5] its deadline after the move, ms from now (0: none)
-- ARGV[6] entering held: how long the hold lasts, ms   ARGV[7] "hand-over": the order
--   goes to the orders stream   ARGV[8] reason   ARGV[9] actor   ARGV[10] ledger max
-- ARGV[11] events channel   ARGV[12..15] the backend's reply: status ("" for none),
--   content type, body, other headers   ARGV[16] the order to keep in the dead letters
--   ("" for none)
-- returns {status, state}: 0 moved (the state entered)   1 there already
--   2 not from its state (its state)   3 no such order   4 not due yet
--   5 its hold ran out (a confirm too late)

local meta_key, idem_key, deadlines_key = KEYS[1], KEYS[2], KEYS[3]
local ledger_key, orders_key, dead_key, record_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id, leavable, target, only_when_due = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == 'due'
local deadline_after, hold_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local hand_over, reason, actor = ARGV[7] == 'hand-over', ARGV[8], ARGV[9]
local ledger_max, channel = tonumber(ARGV[10]), ARGV[11]
local reply_status, dead_payload = ARGV[12], ARGV[16]
local STATES = 'reserving,reserved,held,committed,released,expired,cancelled'
if not listed(STATES, target) or not deadline_after or not hold_ms or not ledger_max
    or (target == 'held' and hold_ms <= 0) then
  return redis.error_reply('cart_move: malformed call (see the argument list at the top)')
end

local record = redis.call('HMGET', record_key, 'state', 'user', 'items', 'idem', 'deadline_ms',
                          'hold_until', 'payload', 'mode')
local state, user, items, idem = record[1], record[2], record[3], record[4]
if not state then
  return {3, ''}
end
if state == target and not listed(leavable, state) then
  return {1, state}
end
if not listed(leavable, state) then
  return {2, state}
end
local now = now_ms()
local deadline = tonumber(record[5]) or 0
local hold_until = tonumber(record[6]) or 0
if only_when_due then
  local at = state == 'held' and hold_until or deadline
  if at == 0 or at > now then
    return {4, state}
  end
end
if state == 'held' and target == 'committed' and hold_until <= now then
  return {5, state}
end

local op = target
local gone = target == 'released' or target == 'expired' or target == 'cancelled'
if target == 'reserved' and state == 'reserved' then
  op = record[8] == 'queue' and 'hand-over' or 'redeliver'
elseif state == 'held' and target == 'committed' then
  op = 'confirm'
end
local fields = {'state', target, 'updated_ms', now}
if target ~= 'reserved' then
  -- the items follow this move: applied once they have (cart_settled.lua)
  fields[#fields + 1] = 'applied'
  fields[#fields + 1] = 0
end
if reason ~= '' then
  fields[#fields + 1] = 'reason'
  fields[#fields + 1] = reason
end
if target == 'held' then
  fields[#fields + 1] = 'hold_until'
  fields[#fields + 1] = now + hold_ms
end
if reply_status ~= '' then
  for i, name in ipairs({'reply_status', 'reply_type', 'reply_body', 'reply_headers'}) do
    fields[#fields + 1] = name
    fields[#fields + 1] = ARGV[11 + i]
  end
end
if hand_over then
  redis.call('XADD', orders_key, '*', 'rid', id, 'payload', record[7] or '')
  if op == 'redeliver' then
    fields[#fields + 1] = 'mode'
    fields[#fields + 1] = 'redelivery'
  end
end
if hand_over or target ~= 'reserved' then
  redis.call('HDEL', record_key, 'payload') -- the stream carries it, or it is settled
end
local next_deadline = deadline_after > 0 and now + deadline_after or 0
fields[#fields + 1] = 'deadline_ms'
fields[#fields + 1] = next_deadline
redis.call('HSET', record_key, unpack(fields))
if next_deadline > 0 then
  redis.call('ZADD', deadlines_key, next_deadline, id)
  announce_due(meta_key, channel, next_deadline, now)
else
  redis.call('ZREM', deadlines_key, id)
end
if gone and idem and idem ~= '' and redis.call('HGET', idem_key, idem) == id then
  redis.call('HDEL', idem_key, idem)
end
if dead_payload ~= '' then
  redis.call('XADD', dead_key, 'MAXLEN', '~', math.max(ledger_max, 1000), '*', 'rid', id,
             'reason', reason, 'payload', dead_payload)
end
if state ~= target then
  count_move(meta_key, state, target, 1)
end
append_cart_ledger(ledger_key, ledger_max, op, id, user, items, actor, reason)
return {0, target}
