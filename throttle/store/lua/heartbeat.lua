-- SPDX-License-Identifier: MIT
-- heartbeat.lua: record one worker as alive and count the live ones, on the server's clock.
--
-- KEYS  [1] the worker set (a sorted set: member -> last beat in us)
-- ARGV  [1] this worker's member name
--       [2] window_us: a worker whose last beat is older than this is no longer counted
-- Returns the number of live workers, this one included.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return redis.call('ZCARD', KEYS[1])
