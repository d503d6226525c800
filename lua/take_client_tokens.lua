-- take_client_tokens.lua: one token per request from per-client buckets (one per
-- user or IP), for a batch of requests, by Redis's clock. Buckets of idle clients
-- expire, so a million clients cost memory only while they are active.
--
-- KEYS[i] the bucket of client i (each client once per call)
-- ARGV[1] tokens per second   ARGV[2] capacity
-- ARGV[2 + i] requests of client i in this batch
-- returns 3 values per client: tokens granted, ms until the next token, tokens left

local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local granted, wait, left = take_from_bucket(key, now, rate, capacity, tonumber(ARGV[2 + i]))
  out[#out + 1] = granted
  out[#out + 1] = wait
  out[#out + 1] = left
end
return out
