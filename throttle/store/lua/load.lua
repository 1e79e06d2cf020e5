-- SPDX-License-Identifier: MIT
-- load.lua: the cluster-wide load factor: what workers report, the hysteresis between
-- reports, and an operator's override. Every admission that asks for the adaptive factors
-- reads KEYS[1].
--
-- KEYS  [1] the factor in force (a string, a number in (0, 1]; absent means 1)
--       [2] the computed factor's state (a hash: computed, changed = us of its last change,
--           ttl = the ttl_ms of the last report)
--       [3] the override (a string, a number in (0, 1]; absent means none)
--       All three share one hash tag.
-- ARGV  [1] now_us: '' to read the server's TIME, else integer us (tests only)
--       [2] op: 'target' (a worker reports the factor its samples call for), 'override'
--           (an operator sets the factor until cleared), 'clear' (removes the override),
--           or 'read'
--       [3] value: the target or the override (ignored by 'clear' and 'read')
--       [4] floor: the computed factor never goes below it
--       [5] step: how much the computed factor may rise at a time
--       [6] relax_us: the least time between two rises (it falls at once)
--       [7] ttl_ms: how long the computed factor lasts without a report (then it is 1 again);
--           other ops keep the one the last report gave
-- Returns {in force, computed, override or ''}, numbers as strings (%.17g).

local now = clock(ARGV[1])
local op = ARGV[2]
local state = redis.call('HMGET', KEYS[2], 'computed', 'changed', 'ttl')
local computed = tonumber(state[1]) or 1
local changed = tonumber(state[2]) or 0
local ttl = tonumber(state[3]) or 1
local override = tonumber(redis.call('GET', KEYS[3]))

local function clamp(v)
  if v > 1 then return 1 end
  return v
end

if op == 'target' then
  ttl = tonumber(ARGV[7])
  local floor, step, relax = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local target = clamp(tonumber(ARGV[3]))
  if target < floor then target = floor end
  if target < computed then
    computed = target
    changed = now
  elseif target > computed and now - changed >= relax then
    computed = computed + step
    if computed > target then computed = target end
    changed = now
  end
  redis.call('HSET', KEYS[2], 'computed', computed, 'changed', changed, 'ttl', ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
elseif op == 'override' then
  override = clamp(tonumber(ARGV[3]))
  redis.call('SET', KEYS[3], override)
elseif op == 'clear' then
  override = nil
  redis.call('DEL', KEYS[3])
end

local live = redis.call('EXISTS', KEYS[2]) == 1
if not live then computed = 1 end
local force = override or computed
if op ~= 'read' then
  if override then
    redis.call('SET', KEYS[1], force)
  elseif force < 1 then
    redis.call('SET', KEYS[1], force, 'PX', ttl)
  else
    redis.call('DEL', KEYS[1])
  end
end
return {fmt(force), fmt(computed), override and fmt(override) or ''}
