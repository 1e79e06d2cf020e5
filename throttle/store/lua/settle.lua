-- SPDX-License-Identifier: MIT
-- settle.lua: correct the charge of an admission once its actual cost is known.
--
-- KEYS  for each limit, as in admit.lua: 't' its state key; 'w' its log and its running total.
--       then, as in admit.lua, the factor keys [3] reads ('k')
-- ARGV  [1] now_us: '' to read the server's TIME, else integer us (tests only)
--       [2] nonce: the nonce the admission wrote its log members with
--       [3] factors, as admit.lua's ARGV[8]: '' when the admission did not apply them
--       [4] n: number of limits
--       then 5 per limit: kind (as in admit.lua), period_us, count, charged (units the
--       admission took), delta (actual - charged; negative refunds). A token bucket that
--       follows a factor settles at the rate in force now (emission interval T / f).
-- Effect: token bucket: a refund moves the TAT back, never before now (never above burst); a
--   charge moves it forward from max(TAT, now), into debt if need be, so later work waits.
--   Sliding window: the admission's entry keeps its time and takes the new cost; if it has
--   already left the window a refund has nothing to return and a charge is logged now.
-- Returns the number of limits changed.

local now = clock(ARGV[1])
local nonce = ARGV[2]
local fspec = ARGV[3]
local n = tonumber(ARGV[4])
local fload, fup = 1, 1
if fspec ~= '' then
  local lsrc, usrc = string.match(fspec, '^(%S+) (%S+)$')
  local tail = #KEYS
  if usrc == 'k' then
    fup = factor(redis.call('GET', KEYS[tail]))
    tail = tail - 1
  end
  if lsrc == 'k' then
    fload = factor(redis.call('GET', KEYS[tail]))
  elseif lsrc ~= '-' then
    fload = factor(lsrc)
  end
end
local changed = 0
local k = 1
for i = 1, n do
  local a = 4 + (i - 1) * 5
  local kind, period, count = ARGV[a + 1], ARGV[a + 2] + 0, ARGV[a + 3] + 0
  local algo, f = string.sub(kind, 1, 1), 1
  if #kind > 1 then
    local flag = string.sub(kind, 2, 2)
    if flag == 'k' then f = fload * fup elseif flag == 'a' then f = fload end
  end
  local charged, delta = ARGV[a + 4] + 0, ARGV[a + 5] + 0
  local key = KEYS[k]
  if algo == 't' then
    k = k + 1
    local T = period / count
    if f ~= 1 then T = T / f end
    local stored = tonumber(redis.call('GET', key))
    if delta ~= 0 and (stored ~= nil or delta > 0) then
      local tat = stored or now
      if delta > 0 then
        if tat < now then tat = now end
        tat = tat + delta * T
      else
        tat = tat + delta * T
        if tat < now then tat = now end
      end
      set_tat(key, tat, stored, now)
      changed = changed + 1
    end
  else
    local totalkey = KEYS[k + 1]
    k = k + 2
    if delta ~= 0 then
      local total = window_total(key, totalkey, now, period)
      local member = fmt(charged) .. ':' .. nonce
      local score = redis.call('ZSCORE', key, member)
      if score then
        local cost = charged + delta
        if cost < 0 then cost = 0 end
        redis.call('ZREM', key, member)
        if cost > 0 then redis.call('ZADD', key, score, fmt(cost) .. ':' .. nonce) end
        total = total + (cost - charged)
        changed = changed + 1
      elseif delta > 0 then
        redis.call('ZADD', key, now, fmt(delta) .. ':' .. nonce .. ':s')
        total = total + delta
        changed = changed + 1
      end
      window_store(key, totalkey, total, now, period)
    end
  end
end
return changed
