-- init_campaign.lua: create a campaign's counters unless they exist already, so
-- that restarting or reloading a gateway never resets stock that is being sold.
--
-- KEYS[1] state hash   KEYS[2] ledger stream
-- ARGV[1] initial stock   ARGV[2] actor   ARGV[3] ledger max length (0: no cap)
-- ARGV[4] the shards the campaign has (kept when created, so that a file that says
--   otherwise later is refused: its stock is spread over them)
-- returns {created (1 or 0), available, reserved, sold, stock_total, shards kept}

local state_key, ledger_key = KEYS[1], KEYS[2]
local stock, actor, ledger_max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local shards = tonumber(ARGV[4] or '1')
if not stock or stock < 0 or stock ~= math.floor(stock) then
  return redis.error_reply('init_campaign: stock must be an integer >= 0')
end

local figures = read_figures(state_key)
if figures then
  local kept = tonumber(redis.call('HGET', state_key, 'shards') or '1')
  return {0, figures.available, figures.reserved, figures.sold, figures.total, kept}
end
figures = {available = stock, reserved = 0, sold = 0, total = stock}
write_figures(state_key, figures)
redis.call('HSET', state_key, 'created_ms', now_ms(), 'shards', shards)
append_ledger(ledger_key, ledger_max, 'init', '', '', stock, actor,
              {available = 0, reserved = 0, sold = 0, total = 0}, figures)
return {1, figures.available, figures.reserved, figures.sold, figures.total, shards}
