-- commit.lua: settle reservations the backend accepted, or payments it confirmed, a
-- batch of them in one call (the commits of one event-loop tick).
--   reserved -> committed   a sale (on_success: commit)
--   reserved -> held        accepted, awaiting payment until a deadline (on_success: hold)
--   held|reserved -> committed   confirm
-- A reservation that went back to stock from "reserved" meanwhile (the backend's
-- answer came after the gateway gave up on it, or after its deadline) is taken again
-- when "retake" is asked and stock and quota permit, its Idempotency-Key bound to it
-- again; not when that key now names a fresh attempt. A hold that expired unpaid (its
-- confirm was told 409 expired) or a reservation an operator cancelled is never taken
-- again. One not taken again is reported as gone, and the ledger records a
-- commit-conflict for reconcile.
--
-- KEYS[1] state hash   KEYS[2] users hash   KEYS[3] ledger stream
-- KEYS[4] deadlines zset   KEYS[5] idempotency hash
-- KEYS[5 + i] reservation record of item i
-- ARGV[1] per-user limit   ARGV[2] actor   ARGV[3] ledger max length (0: no cap)
-- ARGV[4] events channel
-- ARGV[5 + 9 * (i - 1) ...] item i: reservation id, target state ("committed" or
--   "held"), hold time ms (held only), "retake" or "", the states it may leave
--   ("reserved": the backend's answer, or "held": confirm), reply status ("" for
--   none), reply content type, reply body, the reply's other headers (JSON pairs)
-- returns 2 values per item: status, state
--   0 done (state now)   1 already there or beyond (its state)   2 gone (its state)
--   3 no such reservation   4 taken again and done (state now)   5 not from its state

local state_key, users_key, ledger_key, deadlines_key, idem_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user_limit, actor = tonumber(ARGV[1]), ARGV[2]
local ledger_max, channel = tonumber(ARGV[3]), ARGV[4]
local count = (#ARGV - 4) / 9
if not user_limit or not ledger_max then
  return redis.error_reply('commit: the per-user limit and ledger max length must be numbers')
end
if count ~= math.floor(count) or #KEYS ~= 5 + count then
  return redis.error_reply('commit: malformed call (see the argument list at the top)')
end
for i = 1, count do
  local at = 5 + 9 * (i - 1)
  local target, hold_ms = ARGV[at + 1], tonumber(ARGV[at + 2])
  if (target ~= 'committed' and target ~= 'held') or (target == 'held' and not hold_ms) then
    return redis.error_reply('commit: the target must be committed, or held with a hold time')
  end
end

local figures = read_figures(state_key)
local available_at_start = figures and figures.available
local now = now_ms()
local changed = false
local first_hold = nil -- the earliest hold deadline this call sets

-- Whether a reservation gone back to stock may be taken again: only one released
-- from "reserved" ('left' names the state a release left; a record released before
-- 'left' was written left "held" if it kept the backend's reply, as only holds do),
-- and not when the buyer retried with its Idempotency-Key after the release: that
-- attempt stands, and taking this one back too would sell twice under one key.
local function retakeable(rid, state, idem, left, kept_reply)
  if state == 'cancelled' or (left or (kept_reply and 'held' or 'reserved')) ~= 'reserved' then
    return false
  end
  if idem and idem ~= '' then
    local bound = redis.call('HGET', idem_key, idem)
    return not bound or bound == rid
  end
  return true
end

-- Take a reservation gone back to stock again, or say why not (false).
local function take_again(rid, record, retake, before)
  local state, user, qty, idem = record[1], record[2], tonumber(record[3]), record[4]
  local held = tonumber(redis.call('HGET', users_key, user) or '0')
  if not (retake and retakeable(rid, state, idem, record[5], record[6]))
      or figures.available < qty or held + qty > user_limit then
    append_ledger(ledger_key, ledger_max, 'commit-conflict', rid, user, qty, actor, before, figures)
    return false
  end
  figures.available = figures.available - qty
  figures.reserved = figures.reserved + qty
  redis.call('HINCRBY', users_key, user, qty)
  redis.call('HINCRBY', state_key, 'holders_v', 1) -- a holder again: see reserve.lua
  if idem and idem ~= '' then
    redis.call('HSET', idem_key, idem, rid) -- a retry with its key finds it again
  end
  return true
end

local function settle(record_key, rid, target, hold_ms, retake, leavable, reply)
  local record = redis.call('HMGET', record_key, 'state', 'user', 'qty', 'idem', 'left',
                           'reply_status', 'mode')
  local state, user, qty = record[1], record[2], tonumber(record[3])
  if not state then
    return 3, ''
  end
  if state == 'committed' or (state == 'held' and target == 'held') then
    return 1, state
  end
  local gone = state == 'released' or state == 'expired' or state == 'cancelled'
  if gone and not (user and qty) then
    return 2, state -- the tombstone of a reserve call that was undone: nothing was sold
  end
  if not gone and not listed(leavable, state) then
    return 5, state
  end
  if not figures then
    return 3, state
  end
  local before = copy_figures(figures)
  local status, op = 0, target == 'held' and 'hold' or 'commit'
  if gone then
    if not take_again(rid, record, retake, before) then
      redis.call('HSET', record_key, 'conflict', 1)
      return 2, state
    end
    status, op = 4, 'late-' .. op
  elseif state == 'held' then
    op = 'confirm'
  end
  if target == 'committed' then
    figures.reserved = figures.reserved - qty
    figures.sold = figures.sold + qty
    redis.call('ZREM', deadlines_key, rid)
    redis.call('HSET', record_key, 'deadline_ms', 0)
  elseif record[7] ~= 'cart' then -- a cart's order keeps the deadline of its items' hold
    redis.call('ZADD', deadlines_key, now + hold_ms, rid)
    redis.call('HSET', record_key, 'deadline_ms', now + hold_ms)
    first_hold = math.min(first_hold or (now + hold_ms), now + hold_ms)
  end
  redis.call('HSET', record_key, 'state', target, 'updated_ms', now)
  redis.call('HDEL', record_key, 'payload') -- settled: the kept order is not needed now
  count_move(state_key, state, target, 1)
  if reply[1] ~= '' then
    redis.call('HSET', record_key, 'reply_status', reply[1], 'reply_type', reply[2],
               'reply_body', reply[3], 'reply_headers', reply[4])
  end
  append_ledger(ledger_key, ledger_max, op, rid, user, qty, actor, before, figures)
  changed = true
  return status, target
end

local out = {}
for i = 1, count do
  local at = 5 + 9 * (i - 1)
  local status, state = settle(KEYS[5 + i], ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]),
                               ARGV[at + 3] == 'retake', ARGV[at + 4],
                               {ARGV[at + 5], ARGV[at + 6], ARGV[at + 7], ARGV[at + 8]})
  out[#out + 1] = status
  out[#out + 1] = state
end
if changed then
  write_figures(state_key, figures)
  announce(channel, available_at_start, figures.available)
end
if first_hold then
  announce_due(state_key, channel, first_hold, now)
end
return out
