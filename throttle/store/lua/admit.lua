-- SPDX-License-Identifier: MIT
-- admit.lua: all-or-nothing admission of one unit of work against several limits, with an
-- optional booking (reservation) of the next free slot in the limit that binds.
--
-- KEYS  for each limit, in ARGV order: token bucket "t": its state key (a string holding the
--       theoretical arrival time, TAT, in us); sliding window "w": its log (a sorted set of
--       "<cost>:<nonce>" scored by time in us) and its running total (a string);
--       then, when ARGV[9] reads it ('k' first), the load factor key (a string: the
--       cluster-wide factor in (0, 1]); then, when ARGV[9] reads it ('k' second), the
--       tenant's upstream factor key (a string, in (0, 1]); missing keys mean 1;
--       then, when ARGV[4] ~= '', the booking key (a hash: state key -> booked slot in us);
--       then, when ARGV[8] ~= '', the guard key (a string: the live copy's deferral token,
--       '<token>*<generation>*<call>' once it was admitted, or '<old>><new>' while a deferral from
--       copy <old> to copy <new> is under way).
--       All keys must share one hash tag (one Redis Cluster slot).
-- ARGV  [1] now_us: '' to read the server's TIME, else integer us (tests only)
--       [2] reserve: '1' to book the binding limit's next free slot when denied, '0' not
--           to, 'p' to peek: decide as for '0' but charge nothing (the reply tells what
--           admitting the costs would do now; only expired window entries are swept)
--       [3] horizon_us: '' for none; a booking further away than this is not made
--       [4] booking: '' none, 'new' a fresh id (nothing to read), 'old' a booking to redeem
--       [5] redeem: '1' to delete the booking when admitted, '0' to keep it (the caller
--           deletes it once its other slots admitted too)
--       [6] nonce: suffix of the log members this call writes (the booking id when booking)
--       [7] grace_us: how long a booking outlives its slot
--       [8] guard: '' for none, else '<token> <next> <ttl_ms> <generation> <redelivered>
--           <mark> <call>': the token this copy of the work carries and the token its next
--           copy will carry if it is deferred now ('-' for none), then this message's retry and
--           deferral counts ('<retries>.<deferrals>'), '1' if the broker redelivered it, else
--           '0', 'm' to record an admission ('-' not to: the first of several slots, whose
--           caller records it once every slot admitted), and an id of this call (letters and
--           digits), the same when a client sends it again. When the guard key names neither
--           this token nor a deferral from or to it, this copy is a stale twin and the reply
--           is {'stale', 0, 0} with nothing changed. A denial records '<token>><next>';
--           whichever of the two copies is admitted or deferred first then owns the work, the
--           other is stale. The admission of a copy that has a token records
--           '<token>*<generation>*<call>': another message of that copy of the same generation
--           is then stale too (the copy was published twice: a broker that failed mid-publish),
--           unless the broker redelivered it (its holder may have died before running it). A
--           Celery retry, or the copy deferred again as it is (its admission's answer lost),
--           is of a later generation and is not. An empty guard key lets any copy through (new
--           work, or a store that lost its data).
--       [9] factors: '' for none (every factor 1), else '<load> <upstream>', each 'k' (read
--           it from its key), '-' (none: 1) or a number (the load factor only: given by a
--           caller that cannot read the key, on Redis Cluster)
--       [10] n: number of limits
--       then 5 per limit: kind, period_us, count (units per period), burst (units; ignored
--       by 'w'), cost (units, 0 <= cost <= capacity). kind is the algorithm, 't' (token
--       bucket) or 'w' (sliding window), alone for a limit that ignores the factors, followed
--       by 'a' for one that follows the load factor, or by 'k' for one that follows the load
--       factor times its tenant's upstream factor; then, optionally, '>' and the 1-based
--       indices, joined by '.', of the limits narrower than this one (keyed by its dimensions
--       and more, in the same hash tag: an agent's share within its API key's limit; never a
--       tenant's limits under a global one). A booking made in a limit is
--       also made, for the same slot, in the limits narrower than it, so the work it books
--       takes its share of them too: a runaway agent whose calls are booked in its key's
--       limit fills its own share, which then binds its later calls, instead of filling the
--       key's limit against its siblings. A factor f scales the refill rate: a token
--       bucket's emission interval becomes T / f (its burst, in time, is unchanged, so in
--       units it shrinks by f too, but never below the cost at hand), a window's count
--       becomes count * f.
-- Returns {outcome, binding (1-based limit index, 0 for none), retry_after_us,
--          then 4 per limit: remaining in millionths of a unit (rounded), us until full,
--          us until it admits the cost, 1 if the booking presented paid for this limit (it
--          was not charged now) else 0, then now_us (the time this call decided at)}.
--          Durations are rounded up to whole microseconds, so work that comes back after
--          retry_after_us is never early.
--   outcome: 'admitted', 'redeemed' (admitted by a booking), 'denied', 'booked', 'early'
--   (a booking presented before its slot), 'horizon' (the slot was beyond the horizon),
--   'stale' (see ARGV[8]; the reply then has no per-limit part).
-- Every number in the reply is an integer: formatting numbers in Lua is slow, and a Lua
-- number passed to redis.call is stored exactly (as %.17g or shortest round-trip form).

local now = clock(ARGV[1])
local reserve = ARGV[2] == '1'
local peek = ARGV[2] == 'p'
local horizon = tonumber(ARGV[3])
local bmode = ARGV[4]
local nonce = ARGV[6]
local grace = tonumber(ARGV[7])
local fspec = ARGV[9]
local n = tonumber(ARGV[10])
local tail = #KEYS
local gkey, gcur, gnext, gttl, ggen, gagain, gmark, gcall
local claimed = false
if ARGV[8] ~= '' then
  gkey = KEYS[tail]
  tail = tail - 1
  gcur, gnext, gttl, ggen, gagain, gmark, gcall =
    string.match(ARGV[8], '^(%S+) (%S+) (%d+) (%d+%.%d+) ([01]) ([m%-]) (%w+)$')
end
local bkey = nil
local booked = {}
if bmode ~= '' then
  bkey = KEYS[tail]
  tail = tail - 1
  if bmode == 'old' then
    local flat = redis.call('HGETALL', bkey)
    for j = 1, #flat, 2 do booked[flat[j]] = tonumber(flat[j + 1]) end
  end
end
local lsrc, usrc, lkey, ukey = '-', '-', nil, nil
if fspec ~= '' then
  lsrc, usrc = string.match(fspec, '^(%S+) (%S+)$')
  if usrc == 'k' then
    ukey = KEYS[tail]
    tail = tail - 1
  end
  if lsrc == 'k' then lkey = KEYS[tail] end
end

-- One MGET reads every token bucket and the guard (the most common admission makes no other
-- read): redis.call is the dominant cost of a script.
local reads = {}
local k = 1
for i = 1, n do
  if string.sub(ARGV[10 + (i - 1) * 5 + 1], 1, 1) == 't' then
    reads[#reads + 1] = KEYS[k]
    k = k + 1
  else
    k = k + 2
  end
end
local nt = #reads
if lkey then reads[#reads + 1] = lkey end
if ukey then reads[#reads + 1] = ukey end
if gkey then reads[#reads + 1] = gkey end
local tvals = {}
if #reads > 0 then tvals = redis.call('MGET', unpack(reads)) end
local fload, fup = 1, 1
if lkey then fload = factor(tvals[nt + 1]) elseif lsrc ~= '-' then fload = factor(lsrc) end
if ukey then fup = factor(tvals[#reads - (gkey and 1 or 0)]) end
if gkey then
  local live = tvals[#reads]
  if live then
    local from, to = string.match(live, '^(%S+)>(%S+)$')
    if from then
      if gcur ~= from and gcur ~= to then return {'stale', 0, 0} end
      claimed = true
    else
      local mine = gcur .. '*' .. ggen .. '*'
      if string.sub(live, 1, #mine) == mine then
        -- This copy was admitted in this generation: by this very call (a client that sent it
        -- again after losing the answer) it goes on; by another message, that is a twin.
        if live ~= mine .. gcall and gagain ~= '1' then return {'stale', 0, 0} end
      elseif live ~= gcur and string.sub(live, 1, #gcur + 1) ~= gcur .. '*' then
        return {'stale', 0, 0}
      end
    end
  end
end

-- Evaluate every limit without writing anything but window expiry.
local L = {}
local t = 0
k = 1
for i = 1, n do
  local a = 10 + (i - 1) * 5
  local kind = ARGV[a + 1]
  local e = {algo = kind, period = tonumber(ARGV[a + 2]), count = tonumber(ARGV[a + 3]),
             cost = tonumber(ARGV[a + 5]), key = KEYS[k], T = 0, tau = 0, tat = 0, new_tat = 0,
             free_at = 0, booked = false, totalkey = false, total = 0, stored = false}
  local f = 1
  if #kind > 1 then
    e.algo = string.sub(kind, 1, 1)
    local flag = string.sub(kind, 2, 2)
    if flag == 'k' then f = fload * fup elseif flag == 'a' then f = fload end
  end
  if e.algo == 't' then
    e.T = e.period / e.count
    e.tau = tonumber(ARGV[a + 4]) * e.T
    if f ~= 1 then
      e.T = e.T / f
      -- The burst shrinks with the factor, but never below this work's cost: a cost the
      -- bucket could hold at the full rate must stay admissible at any factor.
      local need = e.cost * e.T
      if e.tau < need then e.tau = need end
    end
    t = t + 1
    e.stored = tonumber(tvals[t])
    e.tat = e.stored or now
    local base = e.tat
    if base < now then base = now end
    e.new_tat = base + e.cost * e.T
    e.free_at = e.new_tat - e.tau
    k = k + 1
  else
    if f ~= 1 then e.count = e.count * f end
    e.totalkey = KEYS[k + 1]
    e.total = window_total(e.key, e.totalkey, now, e.period)
    if e.total + e.cost <= e.count then
      e.free_at = now
    else
      local need = e.total + e.cost - e.count
      local freed = 0
      local entries = redis.call('ZRANGE', e.key, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + member_cost(entries[j])
        e.free_at = tonumber(entries[j + 1]) + e.period
        if freed >= need then break end
      end
    end
    k = k + 2
  end
  local slot = booked[e.key]
  if slot ~= nil then
    e.booked = true
    if slot <= now then e.free_at = now else e.free_at = slot end
  end
  L[i] = e
end

local binding = 0
for i = 1, n do
  if L[i].free_at > now and (binding == 0 or L[i].free_at > L[binding].free_at) then
    binding = i
  end
end

-- Charge one limit at time `at` (now, or the booked slot).
local function charge(e, at)
  if e.cost == 0 or peek then return end
  if e.algo == 't' then
    -- A narrower limit booked for a later slot is charged at that slot: charged from now, it
    -- would bank the idle time before the slot beyond its burst, and the runs booked in a
    -- wider limit would come at the wider limit's pace. (Else, and for the binding limit,
    -- whose slot never lies beyond its own TAT, this is new_tat.)
    if at > e.tat then e.tat = at + e.cost * e.T else e.tat = e.new_tat end
    set_tat(e.key, e.tat, e.stored, now)
  else
    redis.call('ZADD', e.key, at, fmt(e.cost) .. ':' .. nonce)
    e.total = e.total + e.cost
  end
end

local outcome
local retry = 0
if binding == 0 then
  outcome = 'admitted'
  for i = 1, n do
    if L[i].booked then outcome = 'redeemed' else charge(L[i], now) end
  end
  if bkey and bmode == 'old' and ARGV[5] == '1' then redis.call('DEL', bkey) end
else
  local b = L[binding]
  retry = b.free_at - now
  if b.booked then
    outcome = 'early'
  elseif not reserve then
    outcome = 'denied'
  elseif horizon ~= nil and retry > horizon then
    outcome = 'horizon'
    retry = horizon
  else
    outcome = 'booked'
    charge(b, b.free_at)
    booked[b.key] = b.free_at
    redis.call('HSET', bkey, b.key, b.free_at)
    local narrower = string.match(ARGV[10 + (binding - 1) * 5 + 1], '>([%d.]+)$')
    if narrower then
      for j in string.gmatch(narrower, '%d+') do
        local e = L[tonumber(j)]
        if not e.booked then
          charge(e, b.free_at)
          booked[e.key] = b.free_at
          redis.call('HSET', bkey, e.key, b.free_at)
        end
      end
    end
    local last = b.free_at
    for _, slot in pairs(booked) do if slot > last then last = slot end end
    redis.call('PEXPIRE', bkey, ttl_ms(last + grace, now))
  end
end

if gkey then
  local ran = outcome == 'admitted' or outcome == 'redeemed'
  if not ran and gnext ~= '-' then
    redis.call('SET', gkey, gcur .. '>' .. gnext, 'PX', gttl)
  elseif ran and gcur ~= '-' and gmark == 'm' then
    redis.call('SET', gkey, gcur .. '*' .. ggen .. '*' .. gcall, 'PX', gttl)
  elseif claimed then
    redis.call('SET', gkey, gcur, 'PX', gttl)
  end
end

local out = {outcome, binding, math.ceil(retry)}
for i = 1, n do
  local e = L[i]
  local remaining, full_at
  if e.algo == 't' then
    local level = e.tat
    if level < now then level = now end
    remaining = (e.tau - (level - now)) / e.T
    full_at = level
  else
    full_at = window_store(e.key, e.totalkey, e.total, now, e.period)
    remaining = e.count - e.total
  end
  local wait = e.free_at - now
  if wait < 0 then wait = 0 end
  local until_full = full_at - now
  if until_full < 0 then until_full = 0 end
  out[#out + 1] = math.floor(remaining * 1000000 + 0.5)
  out[#out + 1] = math.ceil(until_full)
  out[#out + 1] = math.ceil(wait)
  out[#out + 1] = e.booked and 1 or 0
end
out[#out + 1] = now
return out
