-- audit_at_once.lua: the reference reconcile tests/test_reconcile_live.py checks the
-- live one against (what lua/audit.lua did until reconcile read the books in chunks):
-- recount a campaign from its reservation records and compare with its counters and
-- its users' quotas; with "repair", make them agree. One atomic pass over every record,
-- so no purchase slips in between the count and the repair, and none is decided while
-- it runs: 557 ms of Redis for 89,000 reservations. limiter/audit.py must reach the
-- same verdict on a quiet campaign. Run with lua/_prelude.lua in front of it.
--
-- Which side wins: for reserved, sold and the quotas, the reservation records. Each
-- was written in the same atomic step as the counter change it accounts for, one
-- order each, so they are the finer truth. For stock_total, the ledger: it is the
-- stock the operators stated (the initial stock plus every adjustment), and every
-- legitimate change writes its "after" figures there in the same atomic step, so
-- the last entry holds the total as it should be (without a ledger it is kept).
-- available becomes stock_total - reserved - sold.
-- An indexed reservation whose record is gone (Redis lost data, or a hand deletion)
-- makes the records an incomplete truth: they would undercount what was sold and
-- put sold units back on sale. Then nothing is repaired; the audit says so.
--
-- KEYS[1] state hash   KEYS[2] users hash   KEYS[3] index zset   KEYS[4] ledger stream
-- KEYS[4 + i] the record of reservation i (every reservation in the index)
-- ARGV[1] "repair" or ""   ARGV[2] actor   ARGV[3] ledger max length   ARGV[4] events channel
-- returns {status, counters "a/r/s/t", reserved by records, sold by records,
--          users whose quota differs, a list of {user, counter, records} (at most 100),
--          the ledger's last "after" figures ("" if none), counters after a repair,
--          reservations by state where the count kept beside the counters differs:
--          a list of {state, counted, records}, indexed reservations without a record,
--          1 when repaired}
--   status 0 audited (and repaired when asked and safe), 1 the index changed since the
--   caller read it: read it again, 2 no such campaign

local state_key, users_key, index_key, ledger_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local repair, actor, ledger_max, channel = ARGV[1] == 'repair', ARGV[2], tonumber(ARGV[3]), ARGV[4]

if redis.call('ZCARD', index_key) ~= #KEYS - 4 then
  return {1}
end
local figures = read_figures(state_key)
if not figures then
  return {2}
end

local reserved, sold, held_by, missing = 0, 0, {}, 0
local states = {reserved = 0, held = 0, committed = 0, released = 0, expired = 0, cancelled = 0}
for i = 5, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 'state', 'user', 'qty')
  local state, user, qty = r[1], r[2], tonumber(r[3])
  if not state then
    missing = missing + 1
  else
    states[state] = (states[state] or 0) + 1
    if state == 'reserved' or state == 'held' then
      reserved = reserved + qty
    elseif state == 'committed' then
      sold = sold + qty
    end
    if state == 'reserved' or state == 'held' or state == 'committed' then
      held_by[user] = (held_by[user] or 0) + qty
    end
  end
end

local differ, listed_users = 0, {}
local quotas = redis.call('HGETALL', users_key)
local seen = {}
for i = 1, #quotas, 2 do
  local user, units = quotas[i], tonumber(quotas[i + 1])
  seen[user] = true
  if units ~= (held_by[user] or 0) then
    differ = differ + 1
    if #listed_users < 100 then
      listed_users[#listed_users + 1] = {user, units, held_by[user] or 0}
    end
  end
end
for user, units in pairs(held_by) do
  if not seen[user] then
    differ = differ + 1
    if #listed_users < 100 then
      listed_users[#listed_users + 1] = {user, 0, units}
    end
  end
end

local counts = {}
for state, n in pairs(states) do
  local counted = tonumber(redis.call('HGET', state_key, 'n:' .. state) or '0')
  if counted ~= n then
    counts[#counts + 1] = {state, counted, n}
  end
end

local last = redis.call('XREVRANGE', ledger_key, '+', '-', 'COUNT', 1)
local ledger_after = ''
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'after' then
      ledger_after = fields[i + 1]
    end
  end
end

local counters = figures_text(figures)
local repaired = repair and missing == 0
if repaired then
  local before = copy_figures(figures)
  figures.reserved, figures.sold = reserved, sold
  local ledger_total = tonumber(string.match(ledger_after, '^[-%d]+/[-%d]+/[-%d]+/([-%d]+)$'))
  figures.total = math.max(ledger_total or figures.total, reserved + sold)
  figures.available = figures.total - reserved - sold
  write_figures(state_key, figures)
  redis.call('DEL', users_key)
  for user, units in pairs(held_by) do
    redis.call('HSET', users_key, user, units)
  end
  for state, n in pairs(states) do
    redis.call('HSET', state_key, 'n:' .. state, n)
  end
  append_ledger(ledger_key, ledger_max, 'repair', '', '', 0, actor, before, figures,
                'counters made to agree with the reservation records')
  announce(channel, before.available, figures.available)
end
return {0, counters, reserved, sold, differ, listed_users, ledger_after, figures_text(figures),
        counts, missing, repaired and 1 or 0}
