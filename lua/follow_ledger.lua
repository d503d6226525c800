-- follow_ledger.lua: the ledger after a reader's position, a bounded step at a time.
-- Reconcile (limiter/books.py) reads a campaign's records in chunks while it sells;
-- the entries appended meanwhile say which reservations and users moved under it.
-- Called with no position, it says only where the ledger stands now: where to start.
--
-- KEYS[1] ledger stream
-- ARGV[1] the position: an entry's id ("0-0" before the first; "" to learn where the
--   ledger stands)   ARGV[2] its seq: entries added up to it   ARGV[3] at most this many
-- returns {intact, entries added so far (-1: Redis before 7.0 does not say), the last
--          entry's id, the entries after the position: id, op, rid, user, qty of each,
--          in one flat list}
--   intact 0: entries after the position are gone (trimmed, or deleted): start again

local ledger_key, position, seq, limit = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if not seq or not limit then
  return redis.error_reply('follow_ledger: the seq and the limit must be numbers')
end
if position == '' then
  local added, last = ledger_stand(ledger_key, '0-0', 0)
  return {1, added, last}
end
local added, last, intact = ledger_stand(ledger_key, position, seq)
if not intact then
  return {0, added, last}
end
local out = {1, added, last}
for _, item in ipairs(ledger_since(ledger_key, position, limit)) do
  out[#out + 1] = item
end
return out
