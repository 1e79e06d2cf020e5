-- SPDX-License-Identifier: MIT
-- guard.lua: record the next copy of deferred work as the live one, unless another copy took
-- the work over meanwhile.
--
-- KEYS  [1] the guard key (a string: the live copy's token, '<token>*<generation>*<call>' once
--       it was admitted, or '<old>><new>' while a deferral from copy <old> to copy <new> is
--       under way)
-- ARGV  [1] the token to record
--       [2] the hand-over it completes ('<old>><new>', as the denial recorded it), or the copy
--           whose admission it follows (its token: the key may hold
--           '<token>*<generation>*<call>', as admit.lua records an admission), or '' to record
--           the token whatever the key holds
--       [3] ttl_ms
-- Returns 1 when recorded; 0 when the key names another copy: the old copy came back (its
-- acknowledgement was lost with the broker, say) and was admitted first, so it owns the work
-- and the new copy will be dropped as stale. A missing key (the store lost its data) records.

local live = redis.call('GET', KEYS[1])
local after = ARGV[2]
if after ~= '' and live and live ~= after and live ~= ARGV[1]
    and string.sub(live, 1, #after + 1) ~= after .. '*' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
