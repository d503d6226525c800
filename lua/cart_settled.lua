-- cart_settled.lua: every item of an order now follows its state (see cart_move.lua):
-- the short deadline that had a sweeper finish the job gives way to the hold's end (a
-- held order) or to none. Nothing happens if the order moved on meanwhile: its new
-- state has items to bring along, and its own deadline.
--
-- KEYS[1] meta hash   KEYS[2] deadlines zset   KEYS[3] the order's record
-- ARGV[1] order id   ARGV[2] the state the items were brought to   ARGV[3] events channel
-- returns 1 settled, 0 not (the order is in another state, or was settled already)

local meta_key, deadlines_key, record_key = KEYS[1], KEYS[2], KEYS[3]
local id, settled_state, channel = ARGV[1], ARGV[2], ARGV[3]
local record = redis.call('HMGET', record_key, 'state', 'applied', 'hold_until')
if record[1] ~= settled_state or record[2] ~= '0' then
  return 0
end
local now = now_ms()
if settled_state == 'held' then
  local hold_until = tonumber(record[3])
  redis.call('HSET', record_key, 'applied', 1, 'deadline_ms', hold_until, 'updated_ms', now)
  redis.call('ZADD', deadlines_key, hold_until, id)
  announce_due(meta_key, channel, hold_until, now)
else
  redis.call('HSET', record_key, 'applied', 1, 'deadline_ms', 0, 'updated_ms', now)
  redis.call('ZREM', deadlines_key, id)
end
return 1
