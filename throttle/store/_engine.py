# SPDX-License-Identifier: MIT
"""The admission arithmetic in pure Python: the reference model of ``lua/admit.lua`` and
``lua/settle.lua``, and the engine of the in-process store.

It takes the same KEYS and ARGV as the scripts and returns the same reply, performing the same
IEEE-754 operations in the same order, so the two agree bit for bit (the model tests check this
with hypothesis). Read the Lua headers for the argument layout; this module keeps the scripts'
names so the two can be read side by side. Not thread-safe: the in-process store locks around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

__all__ = ["Engine"]

MARGIN_MS: Final = 1000
EXPIRY_STEP_MS: Final = 10_000

Reply = list[str | int]


def fmt(x: float) -> str:
    """A number as the scripts write it: %.17g reads back bit-exact."""
    return f"{x:.17g}"


def _ttl_ms(until_us: float, now: float) -> int:
    return math.ceil((until_us - now) / 1000) + MARGIN_MS


def _tat_expiry_ms(tat: float) -> int:
    return math.ceil((tat / 1000 + MARGIN_MS) / EXPIRY_STEP_MS) * EXPIRY_STEP_MS


def _member_cost(member: str) -> float:
    return float(member.split(":", 1)[0])


def _factor(value: float | None) -> float:
    """A stored factor as the script reads it: outside (0, 1] (or missing) counts as 1."""
    if value is None or not value > 0 or value > 1:
        return 1.0
    return value


def _num(arg: str) -> float | None:
    """Lua's ``tonumber`` for the arguments we pass: None for ''."""
    return float(arg) if arg != "" else None


class _Entry:
    __slots__ = (
        "T",
        "algo",
        "booked",
        "cost",
        "count",
        "free_at",
        "key",
        "new_tat",
        "period",
        "stored",
        "tat",
        "tau",
        "total",
        "totalkey",
    )

    def __init__(self, algo: str, period: float, count: float, cost: float, key: str) -> None:
        self.algo = algo
        self.period = period
        self.count = count
        self.cost = cost
        self.key = key
        self.booked = False
        self.T = self.tau = self.tat = self.new_tat = self.free_at = self.total = 0.0
        self.totalkey = ""
        self.stored: float | None = None  # the TAT the key held


class Engine:
    """Redis-like data (strings as floats, sorted sets, hashes) with per-key expiry, and the two
    scripts over it. ``now`` is always passed in, in microseconds."""

    def __init__(self) -> None:
        self.strings: dict[str, float] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.hashes: dict[str, dict[str, float]] = {}
        self.texts: dict[str, str] = {}
        self.text_hashes: dict[str, dict[str, str]] = {}
        self.expires: dict[str, float] = {}

    # -- the Redis commands the scripts use -------------------------------------------------

    def _alive(self, key: str, now: float) -> None:
        at = self.expires.get(key)
        if at is not None and at <= now:
            self.delete(key)

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.strings.pop(key, None)
            self.zsets.pop(key, None)
            self.hashes.pop(key, None)
            self.texts.pop(key, None)
            self.text_hashes.pop(key, None)
            self.expires.pop(key, None)

    def get(self, key: str, now: float) -> float | None:
        self._alive(key, now)
        return self.strings.get(key)

    def set(self, key: str, value: float, ttl_ms: int, now: float) -> None:
        self.strings[key] = float(fmt(value))
        self.expires[key] = now + ttl_ms * 1000

    def set_tat(self, key: str, tat: float, old: float | None, now: float) -> None:
        """A token bucket's TAT, with the expiry rule of ``set_tat`` in common.lua."""
        at = _tat_expiry_ms(tat)
        if old is not None and _tat_expiry_ms(old) == at:
            self.strings[key] = float(fmt(tat))  # the expiry stays
        else:
            self.set(key, tat, at - math.floor(now / 1000), now)

    def set_persistent(self, key: str, value: float) -> None:
        self.delete(key)
        self.strings[key] = float(fmt(value))

    def hget(self, key: str, field: str, now: float) -> float | None:
        self._alive(key, now)
        return self.hashes.get(key, {}).get(field)

    def hincr(self, key: str, field: str, amount: float, now: float) -> None:
        self._alive(key, now)
        fields = self.hashes.setdefault(key, {})
        fields[field] = fields.get(field, 0.0) + amount

    def hdel(self, key: str, field: str) -> None:
        self._remove(self.hashes, key, field)

    def hgetall(self, key: str, now: float) -> dict[str, float]:
        self._alive(key, now)
        return dict(self.hashes.get(key, {}))

    def get_text(self, key: str, now: float) -> str | None:
        self._alive(key, now)
        return self.texts.get(key)

    def set_text(self, key: str, value: str, ttl_ms: int, now: float) -> None:
        self.delete(key)
        self.texts[key] = value
        self.expires[key] = now + ttl_ms * 1000

    def pexpire(self, key: str, ttl_ms: int, now: float) -> None:
        if key in self.strings or key in self.zsets or key in self.hashes:
            self.expires[key] = now + ttl_ms * 1000

    def zset(self, key: str, now: float) -> list[tuple[str, float]]:
        """Members in Redis order: by score, then by member."""
        self._alive(key, now)
        return sorted(self.zsets.get(key, {}).items(), key=lambda ms: (ms[1], ms[0]))

    def zadd(self, key: str, score: float, member: str) -> None:
        self.zsets.setdefault(key, {})[member] = float(fmt(score))

    def zrem(self, key: str, member: str) -> None:
        self._remove(self.zsets, key, member)

    def _remove(self, table: dict[str, dict[str, float]], key: str, member: str) -> None:
        """Remove ``member`` from the hash or sorted set ``key``: Redis deletes a key it
        leaves empty."""
        members = table.get(key)
        if members is not None:
            members.pop(member, None)
            if not members:
                self.delete(key)

    def live_keys(self, now: float) -> list[str]:
        for key in list(self.expires):
            self._alive(key, now)
        return [*self.strings, *self.zsets, *self.hashes, *self.texts, *self.text_hashes]

    # -- helpers shared by both scripts (lua/common.lua) -------------------------------------

    def _window_total(self, log: str, totalkey: str, now: float, period: float) -> float:
        cutoff = now - period
        total = self.get(totalkey, now) or 0.0
        entries = self.zset(log, now)
        old = [m for m, score in entries if score <= cutoff]
        if old:
            for m in old:
                total = total - _member_cost(m)
                self.zrem(log, m)
        if not self.zset(log, now):
            total = 0.0
        return total

    def _window_store(
        self, log: str, totalkey: str, total: float, now: float, period: float
    ) -> float:
        entries = self.zset(log, now)
        if not entries:
            self.delete(log, totalkey)
            return 0.0
        full_at = entries[-1][1] + period
        ttl = _ttl_ms(full_at, now)
        self.set(totalkey, total, ttl, now)
        self.pexpire(log, ttl, now)
        return full_at

    def _factors(
        self, fspec: str, keys: Sequence[str], tail: int, now: float
    ) -> tuple[float, float]:
        """The load and upstream factors an admission or a settlement applies: ``fspec`` as in
        admit.lua's ARGV[8]; their keys end at ``keys[tail]`` (the upstream one last)."""
        fload = fup = 1.0
        if fspec != "":
            lsrc, usrc = fspec.split(" ")
            if usrc == "k":
                fup = _factor(self.get(keys[tail], now))
                tail -= 1
            if lsrc == "k":
                fload = _factor(self.get(keys[tail], now))
            elif lsrc != "-":
                fload = _factor(float(lsrc))
        return fload, fup

    # -- admit.lua ---------------------------------------------------------------------------

    def admit(self, keys: Sequence[str], argv: Sequence[str], now: float) -> Reply:
        reserve = argv[1] == "1"
        peek = argv[1] == "p"
        horizon = _num(argv[2])
        bmode = argv[3]
        redeem = bmode == "old"  # as admit.lua: "keep" redeems and keeps the booking
        if bmode == "keep":
            bmode = "old"
        nonce = argv[4]
        grace = float(argv[5])
        fspec = argv[7]
        n = (len(argv) - 8) // 4
        tail = len(keys) - 1
        gkey: str | None = None
        gcur = gnext = ggen = mark = call = ""
        gttl = 0
        claimed = False
        if argv[6] != "":
            gkey = keys[tail]
            tail -= 1
            gcur, gnext, ttl_text, ggen, again, mark, call = argv[6].split(" ")
            gttl = int(ttl_text)
            live = self.get_text(gkey, now)
            if live is not None:
                if ">" in live:
                    source, target = live.split(">", 1)
                    if gcur not in (source, target):
                        return ["stale", 0, 0]
                    claimed = True
                elif live.startswith(f"{gcur}*{ggen}*"):
                    # Admitted in this generation: by this very call (sent again), or a twin.
                    if live != f"{gcur}*{ggen}*{call}" and again != "1":
                        return ["stale", 0, 0]
                elif live != gcur and not live.startswith(gcur + "*"):
                    return ["stale", 0, 0]
        bkey: str | None = None
        booked: dict[str, float] = {}
        if bmode != "":
            bkey = keys[tail]
            tail -= 1
            if bmode == "old":
                self._alive(bkey, now)
                booked = dict(self.hashes.get(bkey, {}))
        fload, fup = self._factors(fspec, keys, tail, now)

        entries: list[_Entry] = []
        k = 0
        for i in range(n):
            a = 8 + i * 4
            kind = argv[a]
            # A token bucket's T and tau, or a window's period and count (see admit.lua).
            first, second = float(argv[a + 1]), float(argv[a + 2])
            e = _Entry(kind[0], 0.0, 0.0, float(argv[a + 3]), keys[k])
            # As admit.lua: a slot booked here is redeemed unless it has lapsed.
            slot: float | None = None
            if bmode == "old":
                assert bkey is not None
                slot = booked.get(e.key)
                if slot is not None and now > slot + grace:
                    del booked[e.key]
                    self.hdel(bkey, e.key)
                    slot = None
            f = 1.0
            if len(kind) > 1:
                flag = kind[1]
                if flag == "k":
                    f = fload * fup
                elif flag == "a":
                    f = fload
            if e.algo == "t":
                e.T, e.tau = first, second
                if f != 1:
                    e.T = e.T / f
                    need = e.cost * e.T
                    if e.tau < need:
                        e.tau = need
                e.stored = stored = self.get(e.key, now)
                e.tat = stored if stored is not None else now
                base = e.tat
                if base < now:
                    base = now
                e.new_tat = base + e.cost * e.T
                e.free_at = e.new_tat - e.tau
                k += 1
            else:
                e.period, e.count = first, second
                if f != 1:
                    e.count = e.count * f
                e.totalkey = keys[k + 1]
                e.total = self._window_total(e.key, e.totalkey, now, e.period)
                if e.total + e.cost <= e.count:
                    e.free_at = now
                else:
                    need = e.total + e.cost - e.count
                    freed = 0.0
                    for member, score in self.zset(e.key, now):
                        freed = freed + _member_cost(member)
                        e.free_at = score + e.period
                        if freed >= need:
                            break
                k += 2
            if slot is not None:
                e.booked = True
                e.free_at = now if slot <= now else slot
            entries.append(e)

        binding = 0
        for i, e in enumerate(entries, 1):
            if e.free_at > now and (binding == 0 or e.free_at > entries[binding - 1].free_at):
                binding = i

        def charge(e: _Entry, at: float) -> None:
            if e.cost == 0 or peek:
                return
            if e.algo == "t":
                # As admit.lua: a narrower limit booked for a later slot is charged there.
                e.tat = at + e.cost * e.T if at > e.tat else e.new_tat
                self.set_tat(e.key, e.tat, e.stored, now)
            else:
                self.zadd(e.key, at, fmt(e.cost) + ":" + nonce)
                e.total = e.total + e.cost

        retry = 0.0
        if binding == 0:
            outcome = "admitted"
            for e in entries:
                if e.booked:
                    outcome = "redeemed"
                else:
                    charge(e, now)
            if bkey is not None and redeem:
                self.delete(bkey)
        else:
            b = entries[binding - 1]
            retry = b.free_at - now
            if b.booked:
                outcome = "early"
            elif not reserve:
                outcome = "denied"
            elif horizon is not None and retry > horizon:
                outcome = "horizon"
                retry = horizon
            else:
                assert bkey is not None
                outcome = "booked"
                charge(b, b.free_at)
                booked[b.key] = b.free_at
                self.hashes.setdefault(bkey, {})[b.key] = float(fmt(b.free_at))
                _, sep, narrower = argv[8 + (binding - 1) * 4].partition(">")
                for j in narrower.split(".") if sep else ():
                    e = entries[int(j) - 1]
                    if not e.booked:
                        charge(e, b.free_at)
                        booked[e.key] = b.free_at
                        self.hashes[bkey][e.key] = float(fmt(b.free_at))
                for e in entries:
                    if e.booked and booked[e.key] < b.free_at:
                        booked[e.key] = b.free_at
                        self.hashes[bkey][e.key] = float(fmt(b.free_at))
                last = b.free_at
                for slot in booked.values():
                    if slot > last:
                        last = slot
                self.pexpire(bkey, _ttl_ms(last + grace, now), now)

        if gkey is not None:
            ran = outcome in ("admitted", "redeemed")
            if not ran and gnext != "-":
                self.set_text(gkey, gcur + ">" + gnext, gttl, now)
            elif ran and gcur != "-" and mark == "m":
                self.set_text(gkey, f"{gcur}*{ggen}*{call}", gttl, now)
            elif claimed:
                self.set_text(gkey, gcur, gttl, now)

        short = outcome == "admitted"  # the short reply: see admit.lua
        out: Reply = [outcome] if short else [outcome, binding, math.ceil(retry)]
        for e in entries:
            if e.algo == "t":
                level = e.tat
                if level < now:
                    level = now
                remaining = (e.tau - (level - now)) / e.T
                full_at = level
            else:
                full_at = self._window_store(e.key, e.totalkey, e.total, now, e.period)
                remaining = e.count - e.total
            until_full = full_at - now
            if until_full < 0:
                until_full = 0.0
            out += [math.floor(remaining * 1000000 + 0.5), math.ceil(until_full)]
            if not short:
                wait = e.free_at - now
                if wait < 0:
                    wait = 0.0
                out += [math.ceil(wait), 1 if e.booked else 0]
        out.append(int(now))  # as Redis answers a Lua number: an integer
        return out

    # -- settle.lua --------------------------------------------------------------------------

    def settle(self, keys: Sequence[str], argv: Sequence[str], now: float) -> int:
        nonce = argv[1]
        fspec = argv[2]
        n = int(argv[3])
        fload, fup = self._factors(fspec, keys, len(keys) - 1, now)
        changed = 0
        k = 0
        for i in range(n):
            a = 4 + i * 5
            kind, period, count = argv[a], float(argv[a + 1]), float(argv[a + 2])
            algo, f = kind[0], 1.0
            if len(kind) > 1:
                if kind[1] == "k":
                    f = fload * fup
                elif kind[1] == "a":
                    f = fload
            charged, delta = float(argv[a + 3]), float(argv[a + 4])
            key = keys[k]
            if algo == "t":
                k += 1
                T = period / count
                if f != 1:
                    T = T / f
                stored = self.get(key, now)
                if delta != 0 and (stored is not None or delta > 0):
                    tat = stored if stored is not None else now
                    if delta > 0:
                        if tat < now:
                            tat = now
                        tat = tat + delta * T
                    else:
                        tat = tat + delta * T
                        if tat < now:
                            tat = now
                    self.set_tat(key, tat, stored, now)
                    changed += 1
            else:
                totalkey = keys[k + 1]
                k += 2
                if delta != 0:
                    total = self._window_total(key, totalkey, now, period)
                    member = fmt(charged) + ":" + nonce
                    score = dict(self.zset(key, now)).get(member)
                    if score is not None:
                        cost = charged + delta
                        if cost < 0:
                            cost = 0.0
                        self.zrem(key, member)
                        if cost > 0:
                            self.zadd(key, score, fmt(cost) + ":" + nonce)
                        total = total + (cost - charged)
                        changed += 1
                    elif delta > 0:
                        self.zadd(key, now, fmt(delta) + ":" + nonce + ":s")
                        total = total + delta
                        changed += 1
                    self._window_store(key, totalkey, total, now, period)
        return changed

    # -- load.lua ----------------------------------------------------------------------------

    def load(self, keys: Sequence[str], argv: Sequence[str], now: float) -> list[str]:
        op = argv[1]
        computed = self.hget(keys[1], "computed", now)
        changed = self.hget(keys[1], "changed", now)
        kept = self.hget(keys[1], "ttl", now)
        computed = 1.0 if computed is None else computed
        changed = 0.0 if changed is None else changed
        ttl = 1 if kept is None else int(kept)
        override = self.get(keys[2], now)
        if op == "target":
            ttl = int(argv[6])
            floor, step, relax = float(argv[3]), float(argv[4]), float(argv[5])
            target = min(float(argv[2]), 1.0)
            if target < floor:
                target = floor
            if target < computed:
                computed = target
                changed = now
            elif target > computed and now - changed >= relax:
                computed = computed + step
                if computed > target:
                    computed = target
                changed = now
            self.hashes[keys[1]] = {
                "computed": float(fmt(computed)),
                "changed": changed,
                "ttl": float(ttl),
            }
            self.expires[keys[1]] = now + ttl * 1000
        elif op == "override":
            override = min(float(argv[2]), 1.0)
            self.set_persistent(keys[2], override)
        elif op == "clear":
            override = None
            self.delete(keys[2])
        self._alive(keys[1], now)
        if keys[1] not in self.hashes:
            computed = 1.0
        force = override if override is not None else computed
        if op != "read":
            if override is not None:
                self.set_persistent(keys[0], force)
            elif force < 1:
                self.set(keys[0], force, ttl, now)
            else:
                self.delete(keys[0])
        return [fmt(force), fmt(computed), "" if override is None else fmt(override)]

    # -- upstream.lua ------------------------------------------------------------------------

    def upstream(self, keys: Sequence[str], argv: Sequence[str], now: float) -> str:
        op = argv[1]
        change, floor, ttl = float(argv[2]), float(argv[3]), int(argv[4])
        nonce = argv[5]
        hold, quiet = float(argv[6]), float(argv[7])
        n = int(argv[8])
        f = _factor(self.get(keys[0], now))
        held = self.get(keys[1], now)
        if op == "throttled":
            if held is None or now >= held:
                f = f * change
                if f < floor:
                    f = floor
                self.set(keys[1], now + hold, _ttl_ms(now + hold + quiet, now), now)
        elif held is None or now >= held + quiet:
            f = f + change
        if f >= 1:
            f = 1.0
            self.delete(keys[0])
        elif op == "throttled" or change > 0:
            self.set(keys[0], f, ttl, now)
        k = 2
        for i in range(n):
            a = 9 + i * 6
            kind, period, count = argv[a], float(argv[a + 1]), float(argv[a + 2])
            pause = _num(argv[a + 4])
            left = _num(argv[a + 5])
            key = keys[k]
            algo = kind[0]
            follows = kind[1:] == "k" and f != 1
            if algo == "t":
                k += 1
                if pause is not None or left is not None:
                    T = period / count
                    tau = float(argv[a + 3]) * T
                    if follows:
                        T = T / f
                    floor_tat = now
                    if pause is not None:
                        lead = tau - T
                        if lead < 0:
                            lead = 0.0
                        floor_tat = now + pause + lead
                    if left is not None:
                        low = now + tau - left * T
                        if low > floor_tat:
                            floor_tat = low
                    stored = self.get(key, now)
                    if (stored if stored is not None else now) < floor_tat:
                        self.set_tat(key, floor_tat, stored, now)
            else:
                totalkey = keys[k + 1]
                k += 2
                if pause is not None or left is not None:
                    total = self._window_total(key, totalkey, now, period)
                    capacity = count * f if follows else count
                    if left is not None and total + left < capacity:
                        fill = capacity - total - left
                        self.zadd(key, now, fmt(fill) + ":" + nonce + ":r")
                        total = total + fill
                    if pause is not None:
                        self.zadd(key, now + pause - period, fmt(count) + ":" + nonce + ":p")
                        total = total + count
                    self._window_store(key, totalkey, total, now, period)
        return fmt(f)

    # -- sample.lua --------------------------------------------------------------------------

    def sample(self, keys: Sequence[str], argv: Sequence[str], now: float) -> list[str]:
        key = keys[0]
        max_age = float(argv[3])
        self._alive(key, now)
        samples = self.text_hashes.setdefault(key, {})
        if argv[2] != "":
            samples[argv[1]] = f"{int(now)} {argv[2]}"
        live = []
        for member, value in list(samples.items()):
            at, _, sample = value.partition(" ")
            if not at.isdigit() or now - float(at) > max_age:
                del samples[member]
            else:
                live.append(sample)
        if live:
            self.expires[key] = now + (math.ceil(max_age / 1000) + MARGIN_MS) * 1000
        elif not samples:
            self.delete(key)
        return live
