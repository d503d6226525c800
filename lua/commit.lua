-- commit.lua: settle a reservation the backend accepted, or a payment it confirmed.
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
-- KEYS[4] deadlines zset   KEYS[5] reservation record   KEYS[6] idempotency hash
-- ARGV[1] reservation id   ARGV[2] target state, "committed" or "held"
-- ARGV[3] hold time, ms (held only)   ARGV[4] "retake" or ""   ARGV[5] per-user limit
-- ARGV[6] reply status ("" for none)   ARGV[7] reply content type   ARGV[8] reply body
-- ARGV[9] actor   ARGV[10] ledger max length (0: no cap)   ARGV[11] events channel
-- ARGV[12] states it may leave: "reserved" (the backend's answer) or "held" (confirm)
-- ARGV[13] the reply's other headers, JSON pairs ("" for none)
-- returns {status, state}
--   0 done (state now)   1 already there or beyond (its state)   2 gone (its state)
--   3 no such reservation   4 taken again and done (state now)   5 not from its state

local state_key, users_key, ledger_key, deadlines_key, record_key, idem_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local rid, target, hold_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local retake, user_limit = ARGV[4] == 'retake', tonumber(ARGV[5])
local reply_status, reply_type, reply_body = ARGV[6], ARGV[7], ARGV[8]
local actor, ledger_max, channel, leavable = ARGV[9], tonumber(ARGV[10]), ARGV[11], ARGV[12]
local reply_headers = ARGV[13] or ''
if (target ~= 'committed' and target ~= 'held') or (target == 'held' and not hold_ms) then
  return redis.error_reply('commit: the target must be committed, or held with a hold time')
end
if not user_limit or not ledger_max then
  return redis.error_reply('commit: the per-user limit and ledger max length must be numbers')
end

local record = redis.call('HMGET', record_key, 'state', 'user', 'qty', 'idem', 'left',
                         'reply_status')
local state, user, qty, idem = record[1], record[2], tonumber(record[3]), record[4]
if not state then
  return {3, ''}
end
if state == 'committed' or (state == 'held' and target == 'held') then
  return {1, state}
end
local gone = state == 'released' or state == 'expired' or state == 'cancelled'
if gone and not (user and qty) then
  return {2, state} -- the tombstone of a reserve call that was undone: nothing was sold
end
if not gone and not listed(leavable, state) then
  return {5, state}
end

local figures = read_figures(state_key)
if not figures then
  return {3, state}
end
local before = copy_figures(figures)
local now = now_ms()
local status, op = 0, target == 'held' and 'hold' or 'commit'

-- Whether a reservation gone back to stock may be taken again: only one released
-- from "reserved" ('left' names the state a release left; a record released before
-- 'left' was written left "held" if it kept the backend's reply, as only holds do),
-- and not when the buyer retried with its Idempotency-Key after the release: that
-- attempt stands, and taking this one back too would sell twice under one key.
local function retakeable()
  if state == 'cancelled' or (record[5] or (record[6] and 'held' or 'reserved')) ~= 'reserved' then
    return false
  end
  if idem and idem ~= '' and idem_key then
    local bound = redis.call('HGET', idem_key, idem)
    return not bound or bound == rid
  end
  return true
end

if gone then
  local held = tonumber(redis.call('HGET', users_key, user) or '0')
  if not (retake and retakeable()) or figures.available < qty or held + qty > user_limit then
    append_ledger(ledger_key, ledger_max, 'commit-conflict', rid, user, qty, actor, before, figures)
    redis.call('HSET', record_key, 'conflict', 1)
    return {2, state}
  end
  figures.available = figures.available - qty
  figures.reserved = figures.reserved + qty
  redis.call('HINCRBY', users_key, user, qty)
  if idem and idem ~= '' and idem_key then
    redis.call('HSET', idem_key, idem, rid) -- a retry with its key finds it again
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
else
  redis.call('ZADD', deadlines_key, now + hold_ms, rid)
  redis.call('HSET', record_key, 'deadline_ms', now + hold_ms)
end
write_figures(state_key, figures)
redis.call('HSET', record_key, 'state', target, 'updated_ms', now)
redis.call('HDEL', record_key, 'payload') -- settled: the kept order is not needed now
count_move(state_key, state, target, 1)
if reply_status ~= '' then
  redis.call('HSET', record_key, 'reply_status', reply_status, 'reply_type', reply_type,
             'reply_body', reply_body, 'reply_headers', reply_headers)
end
append_ledger(ledger_key, ledger_max, op, rid, user, qty, actor, before, figures)
announce(channel, before.available, figures.available)
return {status, target}
