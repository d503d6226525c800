-- repair_quotas.lua: set users' quotas to the units their reservation records hold,
-- one bounded chunk of users per call (limiter/audit.py), for a reconcile that knows
-- the records as of a ledger position. A user named by an entry since the position
-- has moved since: it is left alone (the reconcile looks at it again); a repair or an
-- init since the position means the reconcile's picture is out of date: nothing is
-- written. The step is itself a ledger entry (figures unchanged), so the next chunk
-- starts from it.
--
-- KEYS[1] state hash   KEYS[2] users hash   KEYS[3] ledger stream
-- ARGV[1] the position: an entry's id ("0-0" before the first)   ARGV[2] its seq
-- ARGV[3] at most this many entries since the position   ARGV[4] actor
-- ARGV[5] ledger max length (0: no cap)   ARGV[6...] pairs: a user, its units (0: none)
-- returns {status, users set, entries added so far (-1: Redis before 7.0 does not
--          say), the id of this step's ledger entry ("" when none was set), the entries since the position before it (id, op,
--          rid, user, qty of each, flat)}
--   status 0 done, 1 more entries since the position than ARGV[3]: follow the ledger
--   and ask again, 2 no such campaign, 3 entries after the position are gone, 4 a
--   repair or an init since the position: audit again

local state_key, users_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]
local position, seq, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local actor, ledger_max = ARGV[4], tonumber(ARGV[5])
if not seq or not limit or not ledger_max or #ARGV % 2 ~= 1 then
  return redis.error_reply('repair_quotas: malformed call (see the argument list at the top)')
end
for i = 7, #ARGV, 2 do
  local units = tonumber(ARGV[i])
  if not units or units < 0 or units ~= math.floor(units) then
    return redis.error_reply('repair_quotas: units must be integers >= 0')
  end
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

local moved = {}
for i = 4, #entries, 5 do
  moved[entries[i]] = true
end
local set = 0
for i = 6, #ARGV, 2 do
  local user, units = ARGV[i], tonumber(ARGV[i + 1])
  if not moved[user] then
    if units > 0 then
      redis.call('HSET', users_key, user, units)
    else
      redis.call('HDEL', users_key, user)
    end
    set = set + 1
  end
end
if set == 0 then
  return {0, 0, added, '', entries}
end
redis.call('HINCRBY', state_key, 'holders_v', 1) -- the holders may differ now: reserve.lua
append_ledger(ledger_key, ledger_max, 'repair', '', '', set, actor, figures, figures,
              string.format('the quotas of %d user(s) made to agree with their records', set))
local own = redis.call('XREVRANGE', ledger_key, '+', '-', 'COUNT', 1)[1][1]
return {0, set, added >= 0 and added + 1 or added, own, entries}
