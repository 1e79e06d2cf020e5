-- SPDX-License-Identifier: MIT
-- upstream.lua: what the upstream provider said about one tenant (an API key), applied to
-- that tenant's shared state: its upstream factor (multiplicative decrease when throttled,
-- additive increase on success) and, when throttled, a pause of its buckets until the
-- provider's delay is over, or a bucket brought down to what the provider says remains.
--
-- KEYS  [1] the tenant's upstream factor (a string, a number in (0, 1]; absent means 1)
--       [2] until when (us) the factor is not cut again: the 429s of calls already in flight
--           when the first one came belong to the same episode and cut it once
--       then for each limit, as in admit.lua: 't' its state key; 'w' its log and its total
--       All keys share the tenant's hash tag.
-- ARGV  [1] now_us: '' to read the server's TIME, else integer us (tests only)
--       [2] op: 'throttled' (the factor is multiplied by [3], never below [4]) or 'ok' (the
--           factor rises by [3], up to 1)
--       [3] change, [4] floor
--       [5] ttl_ms: how long a factor below 1 lasts without news (then it is 1 again)
--       [6] nonce: suffix of the log entries this call writes
--       [7] hold_us: after a cut, how long further 429s do not cut again
--       [8] quiet_us: after that, how long successes do not raise the factor yet (the backlog
--           booked meanwhile is booked at the lower rate; the rise comes after)
--       [9] n: number of limits
--       then 6 per limit: kind (as in admit.lua: 't' or 'w', then 'k' for a limit that follows
--       this tenant's upstream factor, or 'a'), period_us, count, burst, pause_us ('' for
--       none: nothing passes before it ends, then one unit is free and the bucket refills),
--       remaining ('' for none: at most this many units are free now). For a 'k' limit the
--       units are counted at the new upstream factor (the load factor is not applied here, so
--       under load a pause lasts a little longer than asked, never shorter).
-- Returns the tenant's upstream factor now, as a string (%.17g).

local now = clock(ARGV[1])
local op = ARGV[2]
local change, floor, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local nonce = ARGV[6]
local hold, quiet = tonumber(ARGV[7]), tonumber(ARGV[8])
local n = tonumber(ARGV[9])

local f = factor(redis.call('GET', KEYS[1]))
local held = tonumber(redis.call('GET', KEYS[2]))
if op == 'throttled' then
  if held == nil or now >= held then
    f = f * change
    if f < floor then f = floor end
    redis.call('SET', KEYS[2], now + hold, 'PX', ttl_ms(now + hold + quiet, now))
  end
elseif held == nil or now >= held + quiet then
  f = f + change
end
if f >= 1 then
  f = 1
  redis.call('DEL', KEYS[1])
elseif op == 'throttled' or change > 0 then
  -- (a report that changes nothing must not keep a cut factor from lapsing)
  redis.call('SET', KEYS[1], f, 'PX', ttl)
end

local k = 3
for i = 1, n do
  local a = 9 + (i - 1) * 6
  local kind, period, count = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local pause, left = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local key = KEYS[k]
  local algo = string.sub(kind, 1, 1)
  local follows = string.sub(kind, 2, 2) == 'k' and f ~= 1
  if algo == 't' then
    k = k + 1
    if pause or left then
      local T = period / count
      local tau = tonumber(ARGV[a + 4]) * T
      if follows then T = T / f end
      local floor_tat = now
      if pause then
        local lead = tau - T
        if lead < 0 then lead = 0 end
        floor_tat = now + pause + lead
      end
      if left then
        local low = now + tau - left * T
        if low > floor_tat then floor_tat = low end
      end
      local stored = tonumber(redis.call('GET', key))
      if (stored or now) < floor_tat then
        set_tat(key, floor_tat, stored, now)
      end
    end
  else
    local totalkey = KEYS[k + 1]
    k = k + 2
    if pause or left then
      local total = window_total(key, totalkey, now, period)
      local capacity = count
      if follows then capacity = count * f end
      if left and total + left < capacity then
        local fill = capacity - total - left
        redis.call('ZADD', key, now, fmt(fill) .. ':' .. nonce .. ':r')
        total = total + fill
      end
      if pause then
        -- A full window's worth, dated so that it leaves the window when the pause ends.
        redis.call('ZADD', key, now + pause - period, fmt(count) .. ':' .. nonce .. ':p')
        total = total + count
      end
      window_store(key, totalkey, total, now, period)
    end
  end
end
return fmt(f)
