-- take_tokens.lua: lease tokens from a campaign-wide token bucket, by Redis's clock.
-- A gateway process takes a few tokens at a time and spends them locally, so a
-- limit shared by every gateway costs one Redis call per lease, not per request.
-- Two kinds of bucket:
--   fixed  rate_limit: `rate` tokens per second, `capacity` when full;
--   stock  admission_ratio: capacity = ratio x available (read here, atomically),
--          refilled in full every `window` seconds.
--
-- KEYS[1] bucket hash {tokens, ms}   KEYS[2] campaign state hash (stock kind)
-- ARGV[1] "fixed" or "stock"
-- ARGV[2] fixed: tokens per second     stock: the ratio
-- ARGV[3] fixed: capacity              stock: the window, seconds
-- ARGV[4] tokens wanted
-- ARGV[5] stock kind, optional: the available units to size it by, as the caller knows
--   them (a campaign of several shards: their sum, which no script of one slot can read)
-- returns {granted, wait_ms, capacity, left}
--   wait_ms: when fewer than wanted were granted, ms until the next token;
--   -1 when none will ever come (a stock bucket of a sold-out campaign);
--   left: whole tokens still in the bucket after this grant
-- A stock bucket of a campaign whose counters are missing grants what was asked:
-- admission is not the place to decide that; the reservation answers it (503).

local bucket_key, state_key = KEYS[1], KEYS[2]
local kind, a, b, want = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local rate, capacity
if kind == 'stock' then
  local available = ARGV[5] or redis.call('HGET', state_key, 'available')
  if not available then
    return {want, 0, 0, 0}
  end
  available = tonumber(available)
  capacity = a * available
  if available > 0 and capacity < 1 then
    capacity = 1 -- a ratio below 1 must still let the last units be sold
  end
  rate = capacity / b
else
  rate, capacity = a, b
end
local granted, wait, left = take_from_bucket(bucket_key, now_ms(), rate, capacity, want)
return {granted, wait, math.floor(capacity), left}
