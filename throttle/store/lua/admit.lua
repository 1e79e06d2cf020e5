-- SPDX-License-Identifier: MIT
-- admit.lua: all-or-nothing admission of one unit of work against several limits, with an
-- optional booking (reservation) of the next free slot in the limit that binds.
--
-- KEYS  for each limit, in ARGV order: token bucket "t": its state key (a string holding the
--       theoretical arrival time, TAT, in us); sliding window "w": its log (a sorted set of
--       "<cost>:<nonce>" scored by time in us) and its running total (a string);
--       then, when ARGV[8] reads it ('k' first), the load factor key (a string: the
--       cluster-wide factor in (0, 1]); then, when ARGV[8] reads it ('k' second), the
--       tenant's upstream factor key (a string, in (0, 1]); missing keys mean 1;
--       then, when ARGV[4] ~= '', the booking key (a hash: state key -> booked slot in us);
--       then, when ARGV[7] ~= '', the guard key (a string: the live copy's deferral token,
--       '<token>*<generation>*<call>' once it was admitted, or '<old>><new>' while a deferral from
--       copy <old> to copy <new> is under way).
--       All keys must share one hash tag (one Redis Cluster slot).
-- ARGV  [1] now_us: '' to read the server's TIME, else integer us (tests only)
--       [2] reserve: '1' to book the binding limit's next free slot when denied, '0' not
--           to, 'p' to peek: decide as for '0' but charge nothing (the reply tells what
--           admitting the costs would do now; only expired window entries are swept)
--       [3] horizon_us: '' for none; a booking further away than this is not made
--       [4] booking: '' none, 'new' a fresh id (nothing to read), 'old' a booking to redeem
--           (deleted when admitted), 'keep' a booking to redeem and keep (its caller deletes
--           it once its other slots admitted too)
--       [5] nonce: suffix of the log members this call writes (the booking id when booking)
--       [6] grace_us: how late after its slot a booking still redeems. A slot presented
--           later has lapsed: it is dropped from the booking and the work is checked as a
--           fresh arrival in that limit, so late copies never run together beyond
--           rate x grace. (The booking's key lives until its last slot's grace is over, and
--           a little longer: the slot's age is checked here, not left to the key's expiry.)
--           Nothing is given back for a lapsed slot: whether its charge is still in the
--           bucket (no admission found the bucket idle since) is not known.
--       [7] guard: '' for none, else '<token> <next> <ttl_ms> <generation> <redelivered>
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
--       [8] factors: '' for none (every factor 1), else '<load> <upstream>', each 'k' (read
--           it from its key), '-' (none: 1) or a number (the load factor only: given by a
--           caller that cannot read the key, on Redis Cluster)
--       then 4 per limit: kind; for a token bucket its emission interval T (us per unit: period_us
--       / count) and its burst in time tau (us: burst x T), for a sliding window its period_us and
--       count (units per period); then the cost (units, 0 <= cost <= capacity). (Few arguments:
--       Redis builds ARGV as a table grown one entry at a time, and growing it past 16 entries
--       costs an admission about 5% of its time in Redis. Two limits fit.) kind is the algorithm,
--       't' (token bucket) or 'w' (sliding window), alone for a limit that ignores the factors,
--       followed by 'a' for one that follows the load factor, or by 'k' for one that follows the
--       load factor times its tenant's upstream factor; then, optionally, '>' and the 1-based
--       indices, joined by '.', of the limits narrower than this one (keyed by its dimensions and
--       more, in the same hash tag: an agent's share within its API key's limit; never a tenant's
--       limits under a global one). A booking made in a limit is also made, for the same slot, in
--       the limits narrower than it, so the work it books takes its share of them too: a runaway
--       agent whose calls are booked in its key's limit fills its own share, which then binds its
--       later calls, instead of filling the key's limit against its siblings. A factor f scales the
--       refill rate: a token bucket's emission interval becomes T / f (its burst, in time, is
--       unchanged, so in units it shrinks by f too, but never below the cost at hand), a window's
--       count becomes count * f.
-- Returns {outcome, binding (1-based limit index, 0 for none), retry_after_us,
--          then 4 per limit: remaining in millionths of a unit (rounded), us until full,
--          us until it admits the cost, 1 if the booking presented paid for this limit (it
--          was not charged now) else 0, then now_us (the time this call decided at)};
--          for the outcome 'admitted', whose binding, retry_after_us, waits and flags are all
--          0, the short form {'admitted', then 2 per limit: remaining, us until full, then
--          now_us}.
--          Durations are rounded up to whole microseconds, so work that comes back after
--          retry_after_us is never early.
--   outcome: 'admitted', 'redeemed' (admitted by a booking), 'denied', 'booked', 'early'
--   (a booking presented before its slot), 'horizon' (the slot was beyond the horizon),
--   'stale' (see ARGV[7]; the reply then has no per-limit part).
-- Every number in the reply is an integer: formatting numbers in Lua is slow, and a Lua
-- number passed to redis.call is stored exactly (as %.17g or shortest round-trip form).

-- Cost: most of a call's time in Redis is the interpreter's (every table and string it makes)
-- and the redis.calls. So the state of a limit is one array (the fields below), a table such
-- as the booking map is made only when there is one, and each ARGV is read where it is used.

local KIND, KEY, T, TAU, COST, TAT, NEW_TAT, FREE_AT, STORED, BOOKED, TOTALKEY, TOTAL,
      PERIOD, COUNT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14
local TOKEN, WINDOW = 116, 119  -- string.byte('t'), string.byte('w')

local now = clock(ARGV[1])
local peek = ARGV[2] == 'p'
local bmode = ARGV[4]
local redeem = bmode == 'old'  -- delete the booking when admitted
if bmode == 'keep' then bmode = 'old' end
local n = (#ARGV - 8) / 4

-- The common admission, decided apart for speed (it is most of a call's time in Redis): token
-- buckets only, no booking to redeem, no guard, no factors, not a peek. When every limit
-- admits, it is charged and answered here, with the same arithmetic as below; when one does
-- not, the general path below decides (and books) from the same reads.
local read = nil  -- the buckets as read here, when the general path goes on
if bmode ~= 'old' and ARGV[7] == '' and ARGV[8] == '' and ARGV[2] ~= 'p' then
  local ok = true
  for i = 1, n do
    if string.byte(ARGV[4 * i + 5]) ~= TOKEN then ok = false; break end
  end
  if ok then
    local vals = redis.call('MGET', unpack(KEYS, 1, n))
    -- 5 per limit: the TAT once charged, T, tau, the TAT stored, the cost. Sized for two
    -- limits at once, as is the reply: a table that grows costs Redis more than this path's
    -- arithmetic.
    local v = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
    for i = 1, n do
      local a = 4 * i + 4
      -- (Arithmetic reads a number from a string once, tonumber twice: the ARGV here, always
      -- numbers, are read by arithmetic. A stored value that is not a number reads as none.)
      local T_ = ARGV[a + 2] + 0
      local tau = ARGV[a + 3] + 0
      local cost = ARGV[a + 4] + 0
      local stored = tonumber(vals[i])
      local tat = stored or now
      local base = tat
      if base < now then base = now end
      local new_tat = base + cost * T_
      if new_tat - tau > now then ok = false; break end
      local j = 5 * i
      v[j - 4], v[j - 3], v[j - 2], v[j - 1], v[j] = new_tat, T_, tau, stored, cost
    end
    if ok then
      local out = {'admitted', 0, 0, 0, 0, 0}
      for i = 1, n do
        local j = 5 * i
        local tat = v[j - 4]
        if v[j] ~= 0 then set_tat(KEYS[i], tat, v[j - 1], now) end
        if tat < now then tat = now end
        out[2 * i] = math.floor((v[j - 2] - (tat - now)) / v[j - 3] * 1000000 + 0.5)
        out[2 * i + 1] = math.ceil(tat - now)
      end
      out[2 * n + 2] = now
      for j = 2 * n + 3, 6 do out[j] = nil end  -- the reply ends at the first nil
      return out
    end
    read = vals
  end
end
local grace = tonumber(ARGV[6])
local tail = #KEYS
local gkey, gcur, gnext, gttl, ggen, gagain, gmark, gcall
local claimed = false
if ARGV[7] ~= '' then
  gkey = KEYS[tail]
  tail = tail - 1
  gcur, gnext, gttl, ggen, gagain, gmark, gcall =
    string.match(ARGV[7], '^(%S+) (%S+) (%d+) (%d+%.%d+) ([01]) ([m%-]) (%w+)$')
end
local bkey = nil
local booked = nil  -- state key -> booked slot, of the booking presented (or made now)
if bmode ~= '' then
  bkey = KEYS[tail]
  tail = tail - 1
  if bmode == 'old' then
    booked = {}
    local flat = redis.call('HGETALL', bkey)
    for j = 1, #flat, 2 do booked[flat[j]] = tonumber(flat[j + 1]) end
  end
end
local lsrc, usrc, lkey, ukey = '-', '-', nil, nil
if ARGV[8] ~= '' then
  lsrc, usrc = string.match(ARGV[8], '^(%S+) (%S+)$')
  if usrc == 'k' then
    ukey = KEYS[tail]
    tail = tail - 1
  end
  if lsrc == 'k' then lkey = KEYS[tail] end
end

-- One MGET reads every token bucket and the guard (the most common admission makes no other
-- read): redis.call is the dominant cost of a script.
local reads = {}
local nt = 0
local k = 1
for i = 1, n do
  if string.byte(ARGV[4 * i + 5]) == TOKEN then
    nt = nt + 1
    reads[nt] = KEYS[k]
    k = k + 1
  else
    k = k + 2
  end
end
local nr = nt
if lkey then nr = nr + 1; reads[nr] = lkey end
if ukey then nr = nr + 1; reads[nr] = ukey end
if gkey then nr = nr + 1; reads[nr] = gkey end
local tvals = reads
-- (Read already when the common path went on: then every limit is a token bucket, and reads
-- holds their keys alone, in the same order.)
if nr > 0 then tvals = read or redis.call('MGET', unpack(reads)) end
local fload, fup = 1, 1
if lkey then fload = factor(tvals[nt + 1]) elseif lsrc ~= '-' then fload = factor(lsrc) end
if ukey then fup = factor(tvals[nr - (gkey and 1 or 0)]) end
if gkey then
  local live = tvals[nr]
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

-- Evaluate every limit without writing anything but window expiry and the dropping of lapsed
-- slots, and find the one that binds: the one whose next free moment is latest (the first of equals), if that is later
-- than now.
local L = {}
local binding = 0
local t = 0
k = 1
for i = 1, n do
  local a = 4 * i + 4
  local kind = ARGV[a + 1]
  local cost = ARGV[a + 4] + 0
  -- A slot booked in this limit: redeemed unless it has lapsed (see ARGV[6]).
  local slot = nil
  if booked then
    slot = booked[KEYS[k]]
    if slot ~= nil and now > slot + grace then
      booked[KEYS[k]] = nil
      redis.call('HDEL', bkey, KEYS[k])
      slot = nil
    end
  end
  local f = 1
  if #kind > 1 then
    local flag = string.byte(kind, 2)
    if flag == 107 then f = fload * fup elseif flag == 97 then f = fload end  -- 'k', 'a'
  end
  local e
  if string.byte(kind) == TOKEN then
    local T_, tau = ARGV[a + 2] + 0, ARGV[a + 3] + 0
    if f ~= 1 then
      T_ = T_ / f
      -- The burst shrinks with the factor, but never below this work's cost: a cost the
      -- bucket could hold at the full rate must stay admissible at any factor.
      local need = cost * T_
      if tau < need then tau = need end
    end
    t = t + 1
    local stored = tonumber(tvals[t])
    local tat = stored or now
    local base = tat
    if base < now then base = now end
    local new_tat = base + cost * T_
    e = {TOKEN, KEYS[k], T_, tau, cost, tat, new_tat, new_tat - tau, stored, false}
    k = k + 1
  else
    local period, count = ARGV[a + 2] + 0, ARGV[a + 3] + 0
    if f ~= 1 then count = count * f end
    local key, totalkey = KEYS[k], KEYS[k + 1]
    local total = window_total(key, totalkey, now, period)
    local free_at = 0
    if total + cost <= count then
      free_at = now
    else
      local need = total + cost - count
      local freed = 0
      local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + member_cost(entries[j])
        free_at = tonumber(entries[j + 1]) + period
        if freed >= need then break end
      end
    end
    e = {WINDOW, key, 0, 0, cost, 0, 0, free_at, nil, false, totalkey, total, period, count}
    k = k + 2
  end
  if slot ~= nil then
    e[BOOKED] = true
    if slot <= now then e[FREE_AT] = now else e[FREE_AT] = slot end
  end
  L[i] = e
  local free_at = e[FREE_AT]
  if free_at > now and (binding == 0 or free_at > L[binding][FREE_AT]) then binding = i end
end

-- Charge one limit at time `at` (now, or the booked slot).
local function charge(e, at)
  if e[COST] == 0 or peek then return end
  if e[KIND] == TOKEN then
    -- A narrower limit booked for a later slot is charged at that slot: charged from now, it
    -- would bank the idle time before the slot beyond its burst, and the runs booked in a
    -- wider limit would come at the wider limit's pace. (Else, and for the binding limit,
    -- whose slot never lies beyond its own TAT, this is new_tat.)
    if at > e[TAT] then e[TAT] = at + e[COST] * e[T] else e[TAT] = e[NEW_TAT] end
    set_tat(e[KEY], e[TAT], e[STORED], now)
  else
    redis.call('ZADD', e[KEY], at, fmt(e[COST]) .. ':' .. ARGV[5])
    e[TOTAL] = e[TOTAL] + e[COST]
  end
end

local outcome
local retry = 0
if binding == 0 then
  outcome = 'admitted'
  for i = 1, n do
    local e = L[i]
    if e[BOOKED] then outcome = 'redeemed' else charge(e, now) end
  end
  if redeem then redis.call('DEL', bkey) end
else
  local b = L[binding]
  local horizon = tonumber(ARGV[3])
  retry = b[FREE_AT] - now
  if b[BOOKED] then
    outcome = 'early'
  elseif ARGV[2] ~= '1' then
    outcome = 'denied'
  elseif horizon ~= nil and retry > horizon then
    outcome = 'horizon'
    retry = horizon
  else
    outcome = 'booked'
    local slot = b[FREE_AT]
    booked = booked or {}
    charge(b, slot)
    booked[b[KEY]] = slot
    redis.call('HSET', bkey, b[KEY], slot)
    local narrower = string.match(ARGV[4 * binding + 5], '>([%d.]+)$')
    if narrower then
      for j in string.gmatch(narrower, '%d+') do
        local e = L[tonumber(j)]
        if not e[BOOKED] then
          charge(e, slot)
          booked[e[KEY]] = slot
          redis.call('HSET', bkey, e[KEY], slot)
        end
      end
    end
    -- The slots the work already holds in other limits (due by now, or before this one) move
    -- to this one: they stay paid for, and would lapse while the work waits for this slot.
    for i = 1, n do
      local e = L[i]
      if e[BOOKED] and booked[e[KEY]] < slot then
        booked[e[KEY]] = slot
        redis.call('HSET', bkey, e[KEY], slot)
      end
    end
    local last = slot
    for _, s in pairs(booked) do if s > last then last = s end end
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

-- An admission that redeemed nothing (nearly every one) has the short reply: nothing bound, no
-- wait, nothing booked, so only each limit's remaining and time until full are sent.
local short = outcome == 'admitted'
local out, o
if short then out, o = {outcome}, 1 else out, o = {outcome, binding, math.ceil(retry)}, 3 end
for i = 1, n do
  local e = L[i]
  local remaining, full_at
  if e[KIND] == TOKEN then
    local level = e[TAT]
    if level < now then level = now end
    remaining = (e[TAU] - (level - now)) / e[T]
    full_at = level
  else
    full_at = window_store(e[KEY], e[TOTALKEY], e[TOTAL], now, e[PERIOD])
    remaining = e[COUNT] - e[TOTAL]
  end
  local until_full = full_at - now
  if until_full < 0 then until_full = 0 end
  out[o + 1] = math.floor(remaining * 1000000 + 0.5)
  out[o + 2] = math.ceil(until_full)
  if short then
    o = o + 2
  else
    local wait = e[FREE_AT] - now
    if wait < 0 then wait = 0 end
    out[o + 3] = math.ceil(wait)
    out[o + 4] = e[BOOKED] and 1 or 0
    o = o + 4
  end
end
out[o + 1] = now
return out
