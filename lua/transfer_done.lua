-- transfer_done.lua: the receiving shard has a transfer's units (transfer_in.lua):
-- the sending shard forgets it. Units in flight (``out_units``) are what a reconcile
-- adds to the shards' totals until then.
--
-- KEYS[1] state hash   KEYS[2] transfers zset   KEYS[3] the transfer's record
-- ARGV[1] transfer id
-- returns 1 done now, 0 nothing in flight under this id

local state_key, transfers_key, record_key, id = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local record = redis.call('HMGET', record_key, 'state', 'units')
if record[1] ~= 'sent' then
  return 0
end
redis.call('HSET', record_key, 'state', 'done')
redis.call('PEXPIRE', record_key, 86400000)
redis.call('ZREM', transfers_key, id)
redis.call('HINCRBY', state_key, 'out_units', -tonumber(record[2]))
return 1
