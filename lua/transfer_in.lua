-- transfer_in.lua: take in stock another shard of the same campaign sent
-- (transfer_out.lua): the units join this shard's available and its stock_total
-- together, once per transfer id however often it is sent (a sweeper finishing a
-- transfer sends it again).
--
-- KEYS[1] state hash   KEYS[2] ledger stream   KEYS[3] received hash (id -> units)
-- ARGV[1] transfer id   ARGV[2] the sending shard   ARGV[3] units
-- ARGV[4] actor   ARGV[5] ledger max length (0: no cap)   ARGV[6] events channel
-- returns 0 taken in now, 1 taken in before, 2 no such campaign (not created yet)

local state_key, ledger_key, received_key = KEYS[1], KEYS[2], KEYS[3]
local id, from, units = ARGV[1], ARGV[2], tonumber(ARGV[3])
local actor, ledger_max, channel = ARGV[4], tonumber(ARGV[5]), ARGV[6]
if not units or units < 1 or units ~= math.floor(units) or not ledger_max then
  return redis.error_reply('transfer_in: malformed call (see the argument list at the top)')
end

if redis.call('HEXISTS', received_key, id) == 1 then
  return 1
end
local figures = read_figures(state_key)
if not figures then
  return 2
end
local before = copy_figures(figures)
figures.available = figures.available + units
figures.total = figures.total + units
write_figures(state_key, figures)
redis.call('HSET', received_key, id, units)
append_ledger(ledger_key, ledger_max, 'transfer-in', id, '', units, actor, before, figures,
              'from shard ' .. from)
announce(channel, before.available, figures.available)
return 0
