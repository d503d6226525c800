-- repair_counters.lua: make a campaign's counters and per-state counts agree with its
-- reservation records, by the differences a reconcile found at a ledger position
-- (limiter/audit.py; lua/audit_close.lua is where it took them).
--
-- Which side wins: for reserved, sold and the counts, the reservation records. Each
-- was written in the same atomic step as the counter change it accounts for, one
-- order each, so they are the finer truth. For stock_total, the ledger: it is the
-- stock the operators stated (the initial stock plus every adjustment), and every
-- legitimate change writes its "after" figures there in the same atomic step, so the
-- last entry held the total as it should be. available becomes stock_total - reserved
-- - sold. The reconcile works these out; this step adds them as differences.
--
-- The campaign may have sold since the position: every legitimate change moves a
-- counter and the records alike (and available + reserved + sold - stock_total not at
-- all), so the differences still hold and are added to the counters as they are now.
-- A repair or an init since the position would break that: then nothing is written.
-- Should units have been sold meanwhile on phantom stock, available would go below
-- zero: stock_total grows to cover them instead, as a repair at that instant would have
-- made it (at least reserved + sold).
--
-- KEYS[1] state hash   KEYS[2] ledger stream
-- ARGV[1] the position: an entry's id ("0-0" before the first)   ARGV[2] its seq
-- ARGV[3] at most this many entries since the position   ARGV[4] actor
-- ARGV[5] ledger max length (0: no cap)   ARGV[6] events channel
-- ARGV[7] differences to add, "available/reserved/sold/stock_total"
-- ARGV[8...] pairs: a state, the difference to add to its count ("n:<state>")
-- returns {status, counters after "a/r/s/t", entries added so far (-1: Redis before
--          7.0 does not say), the id of this repair's ledger entry, the entries since the position before it (id, op,
--          rid, user, qty of each, flat)}
--   status 0 repaired, 1 more entries since the position than ARGV[3]: follow the
--   ledger and ask again, 2 no such campaign, 3 entries after the position are gone,
--   4 a repair or an init since the position: audit again

local state_key, ledger_key = KEYS[1], KEYS[2]
local position, seq, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local actor, ledger_max, channel = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local da, dr, ds, dt = string.match(ARGV[7] or '', '^([-%d]+)/([-%d]+)/([-%d]+)/([-%d]+)$')
if not seq or not limit or not ledger_max or not dt or #ARGV % 2 ~= 1 then
  return redis.error_reply('repair_counters: malformed call (see the argument list at the top)')
end

local figures = read_figures(state_key)
if not figures then
  return {2}
end
local added, _, intact = ledger_stand(ledger_key, position, seq)
if not intact then
  return {3}
end
local entries = ledger_since(ledger_key, position, limit + 1)
if #entries > 5 * limit then
  return {1}
end
if resets(entries) then
  return {4}
end

local before = copy_figures(figures)
figures.available = figures.available + tonumber(da)
figures.reserved = figures.reserved + tonumber(dr)
figures.sold = figures.sold + tonumber(ds)
figures.total = figures.total + tonumber(dt)
if figures.available < 0 then
  figures.total = figures.total - figures.available
  figures.available = 0
end
write_figures(state_key, figures)
for i = 8, #ARGV, 2 do
  redis.call('HINCRBY', state_key, 'n:' .. ARGV[i], tonumber(ARGV[i + 1]))
end
append_ledger(ledger_key, ledger_max, 'repair', '', '', 0, actor, before, figures,
              'counters made to agree with the reservation records')
announce(channel, before.available, figures.available)
local own = redis.call('XREVRANGE', ledger_key, '+', '-', 'COUNT', 1)[1][1]
return {0, figures_text(figures), added >= 0 and added + 1 or added, own, entries}
