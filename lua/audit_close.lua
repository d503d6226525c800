-- audit_close.lua: the one instant a reconcile's verdict is taken at (limiter/books.py).
-- The reconcile has read the records and quotas in chunks while the campaign sold, and
-- followed the ledger up to a position; this step reads, atomically, what completes
-- the picture: the counters and the per-state counts, the ledger's last "after"
-- figures, the entries since the position (each says which reservation it moved, and
-- to which state), the quotas of the users they name or the reconcile still asks
-- about, and how many reservations the index holds (to check the reconcile knows them
-- all). Bounded: refused when more entries than ARGV[3] came since the position (the
-- reconcile follows the ledger further first), and it reads only the users it is given.
--
-- KEYS[1] state hash   KEYS[2] users hash   KEYS[3] ledger stream   KEYS[4] index zset
-- ARGV[1] the position: an entry's id ("0-0" before the first)   ARGV[2] its seq
-- ARGV[3] at most this many entries since the position   ARGV[4...] users to read
-- returns {status, the state hash as a flat list, entries added so far (-1: Redis
--          before 7.0 does not say), the ledger's last "after" figures ("" if none),
--          the entries since the position (id, op, rid, user, qty of each, flat),
--          quotas (user, units or nil, flat), reservations in the index}
--   status 0 read, 1 more entries since the position than ARGV[3], 2 no such campaign,
--   3 entries after the position are gone (trimmed or deleted): start again

local state_key, users_key, ledger_key, index_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local position, seq, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if not seq or not limit then
  return redis.error_reply('audit_close: the seq and the limit must be numbers')
end
if redis.call('HEXISTS', state_key, 'available') == 0 then
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

local asked, users = {}, {}
local function ask(user)
  if user ~= '' and not asked[user] then
    asked[user] = true
    users[#users + 1] = user
  end
end
for i = 4, #ARGV do
  ask(ARGV[i])
end
for i = 4, #entries, 5 do
  ask(entries[i])
end
local quotas = {}
if #users > 0 then
  local units = redis.call('HMGET', users_key, unpack(users))
  for i, user in ipairs(users) do
    quotas[#quotas + 1] = user
    quotas[#quotas + 1] = units[i]
  end
end

local after = ''
local last = redis.call('XREVRANGE', ledger_key, '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'after' then
      after = fields[i + 1]
    end
  end
end
return {0, redis.call('HGETALL', state_key), added, after, entries, quotas,
        redis.call('ZCARD', index_key)}
