-- hand_over.lua: a queue-mode order may now be delivered.
-- reserve.lua queues the order in the same atomic step as the reservation, with a
-- forward deadline set; the dispatcher leaves an order alone while that deadline is
-- set. The gateway clears it once its buyer is being told 202. A reservation whose
-- requester stopped waiting (told 503: Redis answered too late, or ran the call only
-- after a pause) is never handed over: the gateway's undo releases it and the
-- dispatcher drops the order, so nothing is sold to a buyer told it failed. Should the
-- gateway die first, the sweeper hands the order over once the deadline passes
-- (release.lua): the order is never lost.
--
-- KEYS[1] reservation record   KEYS[2] deadlines zset
-- ARGV[1] reservation id
-- returns 1 handed over, 0 not (no longer reserved, or handed over already)

local record_key, deadlines_key, rid = KEYS[1], KEYS[2], ARGV[1]
if redis.call('HGET', record_key, 'state') ~= 'reserved' then
  return 0
end
if redis.call('ZREM', deadlines_key, rid) == 0 then
  return 0
end
redis.call('HSET', record_key, 'deadline_ms', 0)
return 1
