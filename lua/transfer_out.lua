-- transfer_out.lua: send stock from this shard to another of the same campaign
-- (shards: K): the first of a transfer's three steps, and the one that takes the
-- units. Up to the units asked leave this shard's available and its stock_total
-- together (its books balance at every step), into a transfer record that carries
-- them until the receiving shard has them (transfer_in.lua) and this shard is told
-- so (transfer_done.lua); a sweeper finishes a transfer whose gateway died between
-- the steps, after its deadline. The same transfer id sent again moves nothing more.
--
-- KEYS[1] state hash   KEYS[2] ledger stream   KEYS[3] transfers zset
-- KEYS[4] the transfer's record
-- ARGV[1] transfer id   ARGV[2] the receiving shard   ARGV[3] units wanted
-- ARGV[4] deadline after now, ms   ARGV[5] actor   ARGV[6] ledger max length (0: no cap)
-- ARGV[7] events channel
-- returns {units sent (0: none available), 1 when this id had been sent already}

local state_key, ledger_key, transfers_key, record_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, to, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local deadline_after, actor = tonumber(ARGV[4]), ARGV[5]
local ledger_max, channel = tonumber(ARGV[6]), ARGV[7]
if not want or want < 1 or want ~= math.floor(want) or not deadline_after or not ledger_max then
  return redis.error_reply('transfer_out: malformed call (see the argument list at the top)')
end

local sent = redis.call('HGET', record_key, 'units')
if sent then
  return {tonumber(sent), 1}
end
local figures = read_figures(state_key)
if not figures or figures.available == 0 then
  return {0, 0}
end
local units = math.min(want, figures.available)
local before = copy_figures(figures)
figures.available = figures.available - units
figures.total = figures.total - units
write_figures(state_key, figures)
redis.call('HINCRBY', state_key, 'out_units', units)
local now = now_ms()
redis.call('HSET', record_key, 'to', to, 'units', units, 'state', 'sent', 'created_ms', now)
redis.call('ZADD', transfers_key, now + deadline_after, id)
append_ledger(ledger_key, ledger_max, 'transfer-out', id, '', units, actor, before, figures,
              'to shard ' .. to)
announce(channel, before.available, figures.available)
return {units, 0}
