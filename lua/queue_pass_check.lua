-- queue_pass_check.lua: may these users' passes buy now? Read-only. A purchase checks
-- here, just before its reservation, what the pass (already verified by its signature)
-- cannot say alone: that it was not withdrawn. Unused passes beyond
-- max_passes_per_unit x available are the newest ones (queue_tick.lua withdraws exactly
-- those next), so at any instant at most that many unused passes can buy.
--
-- KEYS[1] passes zset   KEYS[2] used zset   KEYS[3] line zset   KEYS[4] campaign state hash
-- ARGV[1] max_passes_per_unit   ARGV[2 ...] users
-- returns one status per user
--   1 an unused pass within the cap   2 a pass that bought already (good for retries)
--   0 no pass, or it expired
--   3 withdrawn: beyond the cap now, or sent back to the line already

local passes_key, used_key, line_key, state_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local per_unit = tonumber(ARGV[1])
if not per_unit then
  return redis.error_reply('queue_pass_check: malformed call (see the argument list at the top)')
end

local now = now_ms()
local cap = math.floor(per_unit * tonumber(redis.call('HGET', state_key, 'available') or '0'))
local stale = redis.call('ZCOUNT', passes_key, '-inf', now) -- expired, not yet swept
local out = {}
for i = 2, #ARGV do
  local user = ARGV[i]
  local status = 0
  local expires = tonumber(redis.call('ZSCORE', passes_key, user) or '0')
  if expires > now then
    status = (redis.call('ZRANK', passes_key, user) - stale < cap) and 1 or 3
  elseif tonumber(redis.call('ZSCORE', used_key, user) or '0') > now then
    status = 2
  elseif redis.call('ZSCORE', line_key, user) then
    status = 3 -- a holder in line again: queue_tick.lua withdrew the pass
  end
  out[#out + 1] = status
end
return out
