-- hand_over.lua: a queue-mode order goes to the orders stream, to be delivered.
-- reserve.lua keeps the order on the reservation record, with a forward deadline.
-- The gateway hands it over as it tells its buyer 202 (a replayed 202 too), and marks
-- the record so: an undo then leaves it to its delivery. A reservation whose requester
-- stopped waiting (told 503: Redis answered too late, or ran the call only after a
-- pause) is never handed over: the gateway's undo gives it back, and no dispatcher
-- ever sees it. Should the gateway die first, the sweeper queues the order when the
-- deadline passes (release.lua): it is never lost.
--
-- KEYS[1] reservation record   KEYS[2] deadlines zset   KEYS[3] orders stream
-- ARGV[1] reservation id
-- returns 1 handed over now, 0 not (not a reserved queue-mode order waiting for it)

local record_key, deadlines_key, orders_key, rid = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local record = redis.call('HMGET', record_key, 'state', 'mode', 'payload')
if record[1] ~= 'reserved' or record[2] ~= 'queue' or not record[3] then
  return 0 -- not a queue-mode order waiting for it: queued already, or settled
end
queue_kept_order(record_key, deadlines_key, orders_key, rid, record[3], now_ms())
redis.call('HSET', record_key, 'told', '202')
return 1
