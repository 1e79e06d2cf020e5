# SPDX-License-Identifier: MIT
"""Model tests: the Lua scripts, the in-process store and the pure-Python reference engine
agree exactly on random sequences of (advance time, admit, reserve, return, settle); and the
token bucket matches an independent exact-arithmetic model where the float arithmetic is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SECRET, T0
from throttle import Keyspace, Limit, MemoryStore, RedisStore
from throttle.store._engine import Engine
from throttle.store.base import BaseStore, Decision, Guard, Receipt
from throttle.testing import ManualClock

_prefixes = itertools.count()
TENANT = {"api_key": "k0", "agent_id": "a0", "tier": "gold"}


class ReferenceStore(BaseStore):
    """The bare reference: the engine, no lock, no clock, no sweeping."""

    def __init__(self, keyspace: Keyspace, **kwargs: Any) -> None:
        super().__init__(keyspace, **kwargs)
        self.engine = Engine()
        self.now = float(T0)  # the latest time a call passed in, for writes that pass none

    def _run(self, script: str, keys: list[str], argv: list[str]) -> Any:
        self.now = float(argv[0])
        return getattr(self.engine, script)(keys, argv, self.now)

    def _run_admit(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        return self._run("admit", keys, argv)

    def _run_settle(self, keys: list[str], argv: list[str]) -> object:
        return self._run("settle", keys, argv)

    def _run_load(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        return self._run("load", keys, argv)

    def _run_upstream(self, keys: list[str], argv: list[str]) -> object:
        return self._run("upstream", keys, argv)

    def _run_sample(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        return self._run("sample", keys, argv)

    def _delete(self, keys: list[str]) -> None:
        self.engine.delete(*keys)

    def _set_text(self, key: str, value: str, ttl: float) -> None:
        self.engine.set_text(key, value, round(ttl * 1000), self.now)

    def _set_guard(self, key: str, token: str, after: str, ttl: float) -> bool:
        live = self.engine.get_text(key, self.now)
        if after and live is not None and live not in (after, token):
            return False
        self.engine.set_text(key, token, round(ttl * 1000), self.now)
        return True


@st.composite
def limits(draw: st.DrawFn) -> list[Limit]:
    count = draw(st.integers(1, 3))
    out = []
    for i in range(count):
        algorithm = draw(st.sampled_from(["token_bucket", "token_bucket", "sliding_window"]))
        rate_count = draw(st.sampled_from([0.7, 1, 2, 3, 10, 33.3, 100, 1000]))
        period = draw(st.sampled_from(["s", "m", "10s", "h"]))
        per = draw(st.sampled_from([["api_key"], ["api_key", "agent_id"], [], ["api_key", "tier"]]))
        if algorithm == "sliding_window":
            capacity, burst = rate_count, None
        else:
            capacity = burst = draw(st.sampled_from([1, 2, 5, 10, 50, rate_count]))
        out.append(
            Limit(
                f"l{i}",
                f"{rate_count}/{period}",
                burst=burst,
                per=per,
                algorithm=algorithm,
                max_cost=capacity,
                adaptive=draw(st.booleans()),
            )
        )
    return out


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("advance"),
            # Round steps land exactly on window edges and refill moments; odd ones anywhere.
            st.one_of(
                st.sampled_from([0, 1, 100_000, 500_000, 1_000_000, 10_000_000, 60_000_000]),
                st.integers(0, 5_000_000),
            ),
        ),
        st.tuples(
            st.just("admit"),
            st.integers(0, 1),  # api key
            st.integers(0, 1),  # agent
            st.sampled_from([0, 0.5, 1, 1, 1, 2, 3]),  # cost, clipped to each limit's capacity
            st.booleans(),  # reserve
            st.one_of(st.none(), st.integers(0, 30)),  # return with booking number n
            st.one_of(st.none(), st.sampled_from([0.5, 5, 3600])),  # horizon
            st.one_of(
                st.none(),
                st.tuples(
                    st.integers(0, 1),
                    st.sampled_from([None, "a", "b", "c"]),
                    st.sampled_from([None, "a", "b", "c"]),
                ),
            ),
            st.booleans(),  # adaptive
        ),
        st.tuples(
            st.just("peek"),
            st.integers(0, 1),  # api key
            st.integers(0, 1),  # agent
            st.sampled_from([0, 1, 2, 3]),  # cost, clipped to each limit's capacity
            st.booleans(),  # adaptive
        ),
        st.tuples(st.just("guard"), st.integers(0, 1), st.sampled_from(["a", "b"])),
        st.tuples(
            st.just("load"),
            st.sampled_from(["target", "target", "override", "clear"]),
            st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0]),
        ),
        st.tuples(
            st.just("upstream"),
            st.integers(0, 1),  # api key
            st.sampled_from(["throttled", "ok"]),
            st.one_of(st.none(), st.sampled_from([0.0, 0.25, 2.5, 30.0, 200.0])),  # delay
            st.one_of(st.none(), st.sampled_from([0, 0.5, 1, 3])),  # remaining in limit l0
            st.integers(1, 5),  # successes
        ),
        st.tuples(st.just("settle"), st.integers(0, 30), st.sampled_from([0, 0.5, 2, 7])),
        # Booking n's work comes back, with the identity that booked it, at its slot plus a
        # delay in graces (around 1: on time, or lapsed), or now if that has passed.
        st.tuples(
            st.just("comeback"),
            st.integers(0, 30),
            st.sampled_from([0, 0.5, 1, 1, 1, 1.5, 3]),
            st.sampled_from([-1, 0, 1]),  # microseconds either side
        ),
    ),
    min_size=20,
    max_size=80,
)


def _observable(d: Decision) -> tuple[object, ...]:
    """What must agree: everything but the random ids."""
    return (d.outcome, d.retry_after, d.bound_by, d.limits, d.booking is None)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(limit_set=limits(), program=ops)
@pytest.mark.parametrize("grace", [10**6, 30])
def test_lua_memory_and_reference_agree(
    redis_client: redis.Redis, grace: float, limit_set: list[Limit], program: list[tuple[Any, ...]]
) -> None:
    """Random programs give bit-identical decisions in Redis, in memory and in the reference.

    ``grace``: with 30 s, returns come after their booking lapsed too (the scripts check a
    slot's age on their clock, which the test sets). Redis expires a booking's key on its real
    clock, a second after the grace at the earliest (here 31 s or more, far longer than an
    example runs): until then the key must still be there for the Lua store to agree."""
    keyspace = Keyspace(SECRET, prefix=f"m{next(_prefixes)}")
    clock = ManualClock(T0)
    stores: list[BaseStore] = [
        ReferenceStore(keyspace, booking_grace=grace),
        RedisStore(redis_client, keyspace, booking_grace=grace),
        MemoryStore(keyspace, booking_grace=grace, clock=clock),
    ]
    bookings: list[list[str]] = [[] for _ in stores]
    booked: list[tuple[dict[str, str], int]] = []  # each booking's identity and slot (us)
    receipts: list[list[Receipt]] = [[] for _ in stores]
    now = T0
    for op in program:
        if op[0] == "advance":
            now += op[1]
            clock.advance(us=op[1])
            continue
        if op[0] == "comeback":
            _, n, graces, nudge = op
            if n >= len(booked):
                continue
            identity, slot = booked[n]
            # In graces of at most 30 s: the guard, load and upstream keys live 10**6 s, on
            # Redis's real clock, and the test's clock must stay far short of that.
            due = slot + round(graces * min(grace, 30) * 1_000_000) + nudge
            if due - now > 60_000_000:
                # No further than an "advance" goes. (Redis expires keys on its real clock:
                # a jump of an hour and a half to a far slot once outlived the upstream
                # factor's key, then kept an hour, in memory only; it is now kept 10**6 s.)
                continue
            if due > now:
                clock.advance(us=due - now)
                now = due
            costs = {lim.name: min(1, lim.max_cost) for lim in limit_set}
            back = [
                _observable(
                    store.admit(
                        limit_set,
                        identity,
                        cost=costs,
                        reserve=True,
                        booking=bookings[i][n],
                        now_us=now,
                    )
                )
                for i, store in enumerate(stores)
            ]
            assert back[1:] == back[:-1]
            continue
        if op[0] == "settle":
            _, n, factor = op
            if n >= len(receipts[0]):
                continue
            for receipt_list, store in zip(receipts, stores, strict=True):
                receipt = receipt_list[n]
                usage = {c.limit.name: c.cost * factor for c in receipt.charges}
                store.settle(receipt, usage, now_us=now)
            continue
        if op[0] == "peek":
            _, key, agent, cost, adaptive = op
            identity = {"api_key": f"k{key}", "agent_id": f"a{agent}", "tier": "gold"}
            costs = {lim.name: min(cost, lim.max_cost) for lim in limit_set}
            peeks = [
                _observable(
                    store.peek(limit_set, identity, cost=costs, adaptive=adaptive, now_us=now)
                )
                for store in stores
            ]
            assert peeks[1:] == peeks[:-1]
            continue
        if op[0] == "guard":
            for store in stores:
                store.set_guard(limit_set, TENANT, Guard(f"w{op[1]}", op[2]), ttl=10**6)
            continue
        if op[0] == "load":
            _, what, value = op
            loads = []
            for store in stores:
                if what == "target":
                    loads.append(
                        store.report_load(
                            value, floor=0.2, step=0.25, relax=2.0, ttl=10**6, now_us=now
                        )
                    )
                elif what == "override":
                    loads.append(store.override_load_factor(max(value, 0.1), now_us=now))
                else:
                    loads.append(store.override_load_factor(None, now_us=now))
            assert loads[1:] == loads[:-1]
            continue
        if op[0] == "upstream":
            _, key, what, delay, left, successes = op
            identity = {"api_key": f"k{key}", "agent_id": "a0", "tier": "gold"}
            factors = []
            for store in stores:
                remaining = {} if left is None else {"l0": left}
                if what == "ok":
                    factors.append(
                        store.upstream_ok(
                            identity,
                            successes=successes,
                            limits=limit_set,
                            remaining=remaining,
                            quiet=2.0,
                            ttl=10**6,
                            now_us=now,
                        )
                    )
                    continue
                factors.append(
                    store.upstream_throttled(
                        limit_set,
                        identity,
                        delay=delay,
                        remaining=remaining,
                        hold=None if delay is None else delay / 2,
                        quiet=2.0,
                        ttl=10**6,
                        now_us=now,
                    )
                )
            assert factors[1:] == factors[:-1]
            continue
        _, key, agent, cost, reserve, booking_no, horizon, guard, adaptive = op
        identity = {"api_key": f"k{key}", "agent_id": f"a{agent}", "tier": "gold"}
        costs = {lim.name: min(cost, lim.max_cost) for lim in limit_set}
        decisions = []
        for i, store in enumerate(stores):
            booking = None
            if booking_no is not None and booking_no < len(bookings[i]):
                booking = bookings[i][booking_no]
            decisions.append(
                store.admit(
                    limit_set,
                    identity,
                    cost=costs,
                    reserve=reserve,
                    booking=booking,
                    horizon=horizon,
                    guard=None if guard is None else Guard(f"w{guard[0]}", guard[1], guard[2]),
                    adaptive=adaptive,
                    now_us=now,
                )
            )
        reference = _observable(decisions[0])
        for d in decisions[1:]:
            assert _observable(d) == reference
        if decisions[0].booking is not None and booking_no is None:
            booked.append((identity, now + round(decisions[0].retry_after * 1_000_000)))
        for i, d in enumerate(decisions):
            if d.booking is not None and booking_no is None:
                bookings[i].append(d.booking)
            if d.receipt is not None:
                receipts[i].append(d.receipt)


class ExactBucket:
    """An independent token bucket in exact rational arithmetic: tokens and a timestamp."""

    def __init__(self, rate_per_us: Fraction, burst: Fraction) -> None:
        self.rate = rate_per_us
        self.burst = burst
        self.tokens = burst
        self.at: int | None = None

    def admit(self, now: int, cost: Fraction) -> tuple[bool, Fraction]:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True, Fraction(0)
        return False, (cost - self.tokens) / self.rate


@settings(max_examples=150, deadline=None)
@given(
    emission_us=st.sampled_from([1, 7, 1000, 100_000, 250_000, 1_000_000]),
    burst=st.integers(1, 20),
    steps=st.lists(
        st.tuples(st.integers(0, 3_000_000), st.integers(0, 3)), min_size=1, max_size=80
    ),
)
def test_token_bucket_matches_exact_arithmetic(
    emission_us: int, burst: int, steps: list[tuple[int, int]]
) -> None:
    """Where every quantity is a whole number of microseconds, the GCRA engine admits exactly
    what a rational-arithmetic tokens-and-timestamp bucket admits, with the same wait."""
    keyspace = Keyspace(SECRET)
    store = ReferenceStore(keyspace)
    limit = Limit("x", f"1000000/{emission_us}s", burst=burst, max_cost=burst)
    model = ExactBucket(Fraction(1, emission_us), Fraction(burst))
    now = T0
    for dt, cost in steps:
        now += dt
        c = min(cost, burst)
        decision = store.admit([limit], {"api_key": "k"}, cost=c, now_us=now)
        allowed, wait_us = model.admit(now, Fraction(c))
        assert decision.allowed == allowed
        assert decision.retry_after == float(wait_us) / 1_000_000
