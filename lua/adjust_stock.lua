-- adjust_stock.lua: change a campaign's stock while it sells. Atomic against
-- every purchase, since purchases are scripts on the same keys.
--   delta n: available += n and stock_total += n
--   set n:   available = n and stock_total moves by the same difference
--
-- KEYS[1] state hash   KEYS[2] ledger stream
-- ARGV[1] "delta" or "set"   ARGV[2] n   ARGV[3] actor
-- ARGV[4] ledger max length (0: no cap)   ARGV[5] events channel
-- returns {status, available, reserved, sold, stock_total}
--   0 done   1 refused: available would go below zero   2 no such campaign

local state_key, ledger_key = KEYS[1], KEYS[2]
local how, n, actor = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ledger_max, channel = tonumber(ARGV[4]), ARGV[5]
if (how ~= 'delta' and how ~= 'set') or not n or n ~= math.floor(n) or not ledger_max then
  return redis.error_reply('adjust_stock: "delta" or "set" and an integer are required')
end

local figures = read_figures(state_key)
if not figures then
  return {2, 0, 0, 0, 0}
end
local delta = n
if how == 'set' then
  delta = n - figures.available
end
if figures.available + delta < 0 then
  return {1, figures.available, figures.reserved, figures.sold, figures.total}
end
local before = copy_figures(figures)
figures.available = figures.available + delta
figures.total = figures.total + delta
write_figures(state_key, figures)
append_ledger(ledger_key, ledger_max, 'adjust', '', '', delta, actor, before, figures)
announce(channel, before.available, figures.available)
return {0, figures.available, figures.reserved, figures.sold, figures.total}
