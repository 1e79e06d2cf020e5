-- SPDX-License-Identifier: MIT
-- Helpers shared by admit.lua and settle.lua; the store prepends this file to each script.
--
-- Units: times are microseconds on the Redis server's clock (or the test-only ARGV override),
-- periods are microseconds, counts and costs are units (fractional allowed). Numbers are IEEE
-- doubles and are written with %.17g so that they read back bit-exact: throttle/store/_engine.py
-- performs the same operations in the same order and must agree with these scripts exactly.

-- TIME before a write needs effects replication (the default since Redis 5.0; throttle needs
-- 6.0 or later for SET ... KEEPTTL): no
-- redis.replicate_commands() call here, it would cost every admission a call for nothing.

local MARGIN_MS = 1000   -- keys outlive the moment their bucket is full again by this much
-- A token bucket's key expires at a multiple of this (ms): a tenant that comes back within it
-- mostly finds the expiry it needs already set (see set_tat), and an idle one costs memory
-- for at most this much longer.
local EXPIRY_STEP_MS = 10000

local function fmt(x)
  return string.format('%.17g', x)
end

local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]  -- (arithmetic reads a number from a string once, tonumber twice)
end

-- A stored factor: a number in (0, 1]; anything else (never written by throttle) counts as 1.
local function factor(v)
  v = tonumber(v)
  if v == nil or not (v > 0) or v > 1 then return 1 end
  return v
end

local function ttl_ms(until_us, now)
  return math.ceil((until_us - now) / 1000) + MARGIN_MS
end

-- When the key of a token bucket whose TAT is `tat` may go: MARGIN_MS after the bucket is
-- full again, rounded up to a multiple of EXPIRY_STEP_MS (ms, on the clock of `now`).
local function tat_expiry_ms(tat)
  return math.ceil((tat / 1000 + MARGIN_MS) / EXPIRY_STEP_MS) * EXPIRY_STEP_MS
end

-- Store a token bucket's TAT; `old` is the TAT its key holds (nil for none). Every writer
-- gives the key the expiry tat_expiry_ms of the TAT it writes, so while that stays the same
-- (a bucket used again within the step) the expiry already set is right and the write keeps
-- it: setting a new one costs Redis more than the rest of the write (about 2 us a key, where a
-- whole two-limit admission takes about 20 us in Redis).
local function set_tat(key, tat, old, now)
  local at = tat_expiry_ms(tat)
  if old and tat_expiry_ms(old) == at then
    redis.call('SET', key, tat, 'KEEPTTL')
  else
    redis.call('SET', key, tat, 'PX', at - math.floor(now / 1000))
  end
end

-- A log member is "<cost>:<nonce>[...]": the cost travels with the entry.
local function member_cost(member)
  return tonumber(string.match(member, '^([^:]+)'))
end

-- Drop log entries older than the window and return the running total that is left.
local function window_total(log, totalkey, now, period)
  local cutoff = now - period
  local total = tonumber(redis.call('GET', totalkey)) or 0
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #old > 0 then
    for _, m in ipairs(old) do total = total - member_cost(m) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
  end
  if redis.call('ZCARD', log) == 0 then total = 0 end
  return total
end

-- Persist a window's total and give both keys the lifetime of their newest entry.
local function window_store(log, totalkey, total, now, period)
  local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if #newest == 0 then
    redis.call('DEL', log, totalkey)
    return 0
  end
  local full_at = tonumber(newest[2]) + period
  local ttl = ttl_ms(full_at, now)
  redis.call('SET', totalkey, total, 'PX', ttl)
  redis.call('PEXPIRE', log, ttl)
  return full_at
end
