-- SPDX-License-Identifier: MIT
-- sample.lua: record one worker's load sample and return every live one, on the server's
-- clock (workers' own clocks may disagree).
--
-- KEYS  [1] the samples (a hash: worker -> '<us when recorded> <sample>')
-- ARGV  [1] now_us: '' to read the server's TIME, else integer us (tests only)
--       [2] this worker's name
--       [3] its sample ('' to record nothing and only read)
--       [4] max_age_us: a sample older than this is dropped (its worker is gone)
-- Returns the live samples (without their times).

local now = clock(ARGV[1])
local max_age = tonumber(ARGV[4])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[2], string.format('%d', now) .. ' ' .. ARGV[3])
end
local flat = redis.call('HGETALL', KEYS[1])
local live = {}
for j = 1, #flat, 2 do
  local at, sample = string.match(flat[j + 1], '^(%d+) (.*)$')
  if at == nil or now - tonumber(at) > max_age then
    redis.call('HDEL', KEYS[1], flat[j])
  else
    live[#live + 1] = sample
  end
end
if #live > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(max_age / 1000) + MARGIN_MS) end
return live
