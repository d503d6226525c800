-- cart_open.lua: open an order of several items (a cart) before any item is reserved.
-- Each item is reserved afterwards in its own campaign (its own slot, often its own
-- node), which no script can span; this record is what ties them together. It names,
-- before anything is taken, the reservation each item will get, and sets a deadline:
-- an order still "reserving" when it passes (its gateway died, or lost Redis, in the
-- middle) is rolled back by a sweeper, which gives back whatever items were reserved
-- and leaves tombstones for the others, so that a reserve arriving late cannot make
-- them. One Idempotency-Key names one order, bound here with the request's fingerprint.
--
-- KEYS[1] meta hash (counts by state, due_at)   KEYS[2] idempotency hash
-- KEYS[3] index zset   KEYS[4] deadlines zset   KEYS[5] ledger stream
-- KEYS[6] the order's record
-- ARGV[1] order id   ARGV[2] user   ARGV[3] items, "campaign=reservation:quantity,..."
-- ARGV[4] the order for the backend   ARGV[5] mode, "sync" or "queue"
-- ARGV[6] idempotency field ("" for none)   ARGV[7] the request's fingerprint
-- ARGV[8] how long reserving the items may take, ms   ARGV[9] ledger max length
-- ARGV[10] events channel   ARGV[11] actor
-- returns {status, order id}: 0 opened; 1 the key names an earlier order (its id);
--   2 this id was opened already (a repeated call)

local meta_key, idem_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local deadlines_key, ledger_key, record_key = KEYS[4], KEYS[5], KEYS[6]
local id, user, items, payload, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local idem, fingerprint = ARGV[6], ARGV[7]
local window, ledger_max, channel, actor = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10], ARGV[11]
if (mode ~= 'sync' and mode ~= 'queue') or not window or window <= 0 or not ledger_max
    or items == '' then
  return redis.error_reply('cart_open: malformed call (see the argument list at the top)')
end

if redis.call('EXISTS', record_key) == 1 then
  return {2, id}
end
if idem ~= '' then
  local earlier = redis.call('HGET', idem_key, idem)
  if earlier then
    return {1, earlier}
  end
end

local now = now_ms()
local deadline = now + window
redis.call('HSET', record_key, 'user', user, 'state', 'reserving', 'items', items,
           'payload', payload, 'mode', mode, 'idem', idem, 'fp', fingerprint,
           'created_ms', now, 'updated_ms', now, 'deadline_ms', deadline, 'applied', 1,
           'attempts', 0)
if idem ~= '' then
  redis.call('HSET', idem_key, idem, id)
end
redis.call('ZADD', index_key, now, id)
redis.call('ZADD', deadlines_key, deadline, id)
count_move(meta_key, nil, 'reserving', 1)
append_cart_ledger(ledger_key, ledger_max, 'open', id, user, items, actor)
announce_due(meta_key, channel, deadline, now)
return {0, id}
