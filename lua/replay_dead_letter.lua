-- replay_dead_letter.lua: deliver a dead-lettered order again, taking its stock again.
-- A dead letter is an order the dispatcher gave up on after max_attempts failures; its
-- units went back to stock (release.lua). Once the backend is fixed, an operator replays
-- it: the reservation is taken again (stock, the user's quota, its Idempotency-Key) and
-- its order queued for the dispatchers, in one step, or nothing changes and the reason
-- says why (sold out meanwhile, the user bought again, the key names a fresh attempt,
-- an operator cancelled it). The caller reads the entry first (its reservation id names
-- the record's key, which must come in through KEYS); the script checks it again.
--
-- KEYS[1] state hash   KEYS[2] users hash   KEYS[3] idempotency hash
-- KEYS[4] ledger stream   KEYS[5] dead letters stream   KEYS[6] orders stream
-- KEYS[7] reservation record
-- ARGV[1] dead letter entry id   ARGV[2] reservation id   ARGV[3] per-user limit
-- ARGV[4] actor   ARGV[5] ledger max length (0: no cap)   ARGV[6] events channel
-- returns {status, reason}
--   0 replayed: stock taken again, the order queued, the dead letter removed
--   1 no such dead letter   2 its reservation record is gone   3 not released (its state)
--   4 the campaign has no counters   5 not enough stock   6 over the user's limit
--   7 its Idempotency-Key names another reservation now

local state_key, users_key, idem_key, ledger_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dead_key, orders_key, record_key = KEYS[5], KEYS[6], KEYS[7]
local entry_id, rid, user_limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local actor, ledger_max, channel = ARGV[4], tonumber(ARGV[5]), ARGV[6]
if not user_limit or not ledger_max then
  return redis.error_reply('replay_dead_letter: the per-user limit and ledger max length must be numbers')
end

local entry = redis.call('XRANGE', dead_key, entry_id, entry_id)
if #entry == 0 then
  return {1, 'no such dead letter'}
end
local letter = {}
for i = 1, #entry[1][2], 2 do
  letter[entry[1][2][i]] = entry[1][2][i + 1]
end
if letter.rid ~= rid then
  return redis.error_reply('replay_dead_letter: the entry names another reservation')
end

local record = redis.call('HMGET', record_key, 'state', 'user', 'qty', 'idem')
local state, user, qty, idem = record[1], record[2], tonumber(record[3]), record[4]
if not state or not user or not qty then
  return {2, 'its reservation record is gone'}
end
if state ~= 'released' then
  return {3, 'its reservation is ' .. state .. ', not released'}
end
local figures = read_figures(state_key)
if not figures then
  return {4, 'the campaign has no counters in Redis'}
end
if figures.available < qty then
  return {5, string.format('%d left, %d needed', figures.available, qty)}
end
local held = tonumber(redis.call('HGET', users_key, user) or '0')
if held + qty > user_limit then
  return {6, string.format('the user holds %d of at most %d', held, user_limit)}
end
if idem and idem ~= '' then
  local bound = redis.call('HGET', idem_key, idem)
  if bound and bound ~= rid then
    return {7, 'its Idempotency-Key names reservation ' .. bound .. ' now'}
  end
end

local before = copy_figures(figures)
local now = now_ms()
figures.available = figures.available - qty
figures.reserved = figures.reserved + qty
write_figures(state_key, figures)
redis.call('HINCRBY', users_key, user, qty)
if idem and idem ~= '' then
  redis.call('HSET', idem_key, idem, rid)
end
redis.call('HSET', record_key, 'state', 'reserved', 'updated_ms', now, 'attempts', 0,
           'reason', 'replayed from the dead letters')
count_move(state_key, 'released', 'reserved', 1)
redis.call('XADD', orders_key, '*', 'rid', rid, 'payload', letter.payload or '')
redis.call('XDEL', dead_key, entry_id)
append_ledger(ledger_key, ledger_max, 'replay', rid, user, qty, actor, before, figures,
              'dead letter ' .. entry_id .. ' replayed')
announce(channel, before.available, figures.available)
return {0, 'replayed'}
