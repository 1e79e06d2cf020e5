# SPDX-License-Identifier: MIT
"""Admission semantics, run against both stores with the time passed in explicitly."""

from __future__ import annotations

import math

import pytest
import redis

from tests.conftest import T0
from throttle import (
    ConfigurationError,
    CostError,
    IdentityError,
    Keyspace,
    Limit,
    MemoryStore,
    Outcome,
    RedisStore,
)
from throttle.identity import Fingerprint
from throttle.store.base import BaseStore, Guard, Prepared
from throttle.testing import ManualClock

US = 1_000_000
KEY = {"api_key": "tenant-1"}


def test_burst_then_exact_retry_after(store: BaseStore) -> None:
    """A full bucket admits its burst at once, then says exactly when the next unit fits."""
    limit = Limit("req", "10/s", burst=10)
    assert all(store.admit([limit], KEY, now_us=T0).allowed for _ in range(10))
    denied = store.admit([limit], KEY, now_us=T0)
    assert denied.outcome is Outcome.DENIED
    assert denied.bound_by == "req"
    assert denied.retry_after == pytest.approx(0.1, abs=1e-9)
    assert not store.admit([limit], KEY, now_us=T0 + 99_999).allowed
    assert store.admit([limit], KEY, now_us=T0 + 100_000).allowed


def test_a_decision_tells_when_the_store_decided(
    store: BaseStore, redis_client: redis.Redis
) -> None:
    """``at`` is the store's clock at the decision: admitted, denied, booked, and a global
    limit admitted in a slot of its own (Redis Cluster); without a test clock, a Redis
    server's TIME."""
    limit = Limit("req", "1/s", burst=1)
    both = [limit, Limit("all", "100/s", per=[])]
    assert store.admit(both, KEY, now_us=T0).at == T0 / US
    assert store.admit([limit], KEY, now_us=T0 + 7).at == (T0 + 7) / US
    assert store.admit([limit], KEY, reserve=True, now_us=T0 + 9).at == (T0 + 9) / US
    assert store.peek(both, KEY, now_us=T0 + 11).at == (T0 + 11) / US
    if isinstance(store, RedisStore) and not store.sharded:
        seconds, micros = redis_client.time()
        at = store.admit([limit], {"api_key": "tenant-2"}).at
        assert at is not None
        assert seconds + micros / US <= at < seconds + micros / US + 5


def test_rate_below_one_per_second_is_exact(store: BaseStore) -> None:
    """0.7/s with burst 1, tried every 10 ms for 60 s, admits 42 or 43 (not 30)."""
    limit = Limit("slow", "0.7/s", burst=1)
    admitted = sum(store.admit([limit], KEY, now_us=T0 + i * 10_000).allowed for i in range(6000))
    assert admitted in (42, 43)


def test_all_or_nothing(store: BaseStore) -> None:
    """When one limit denies, no limit of the admission is charged."""
    wide = Limit("wide", "100/s", burst=100)
    narrow = Limit("narrow", "1/s", burst=1, per=["api_key", "agent_id"])
    who = {**KEY, "agent_id": "a"}
    assert store.admit([wide, narrow], who, now_us=T0).allowed
    denied = store.admit([wide, narrow], who, now_us=T0)
    assert denied.bound_by == "narrow"
    states = {s.name: s for s in denied.limits}
    assert states["wide"].remaining == 99
    assert states["narrow"].remaining == 0
    assert states["narrow"].retry_after == pytest.approx(1.0)
    assert states["wide"].retry_after == 0


def test_the_latest_free_limit_binds(store: BaseStore) -> None:
    """Among several denying limits, the one whose next free moment is latest is named."""
    a = Limit("a", "10/s", burst=1)
    b = Limit("b", "1/s", burst=1)
    assert store.admit([a, b], KEY, now_us=T0).allowed
    denied = store.admit([a, b], KEY, now_us=T0)
    assert denied.bound_by == "b"
    assert denied.retry_after == pytest.approx(1.0)


def test_reservations_are_spaced_in_arrival_order(store: BaseStore) -> None:
    """100 denied reservations against 10/s get slots 0.1 s apart, in order, each redeemable."""
    limit = Limit("req", "10/s", burst=10)
    for _ in range(10):
        assert store.admit([limit], KEY, reserve=True, now_us=T0).allowed
    bookings = [store.admit([limit], KEY, reserve=True, now_us=T0) for _ in range(100)]
    assert all(d.outcome is Outcome.BOOKED for d in bookings)
    slots = [d.retry_after for d in bookings]
    for i, slot in enumerate(slots, 1):
        assert slot == pytest.approx(0.1 * i, abs=0.001)
    assert slots == sorted(slots)
    for d in bookings:
        at = T0 + math.ceil(d.retry_after * US)
        back = store.admit([limit], KEY, booking=d.booking, reserve=True, now_us=at)
        assert back.outcome is Outcome.REDEEMED, d


def test_agent_bookings_leave_the_key_free(store: BaseStore) -> None:
    """A runaway agent's bookings sit in its own bucket; its sibling is admitted at once."""
    key_limit = Limit("key", "10/s", burst=10)
    agent_limit = Limit("agent", "2/s", burst=2, per=["api_key", "agent_id"])
    limits = [key_limit, agent_limit]
    a = {**KEY, "agent_id": "runaway"}
    b = {**KEY, "agent_id": "polite"}
    outcomes = [store.admit(limits, a, reserve=True, now_us=T0).outcome for _ in range(100)]
    assert outcomes.count(Outcome.ADMITTED) == 2
    assert outcomes.count(Outcome.BOOKED) == 98
    sibling = store.admit(limits, b, reserve=True, now_us=T0)
    assert sibling.allowed
    assert {s.name: s.remaining for s in sibling.limits}["key"] == 7


def test_a_booking_in_the_key_takes_the_agents_share_too(store: BaseStore) -> None:
    """When the key's limit binds, the booking is also made in the agent's share: a runaway
    agent books its key at most at its share's pace, so a sibling arriving after 20 of its
    calls waits one key slot, not twenty."""
    key = Limit("key", "10/s", burst=1)
    share = Limit("share", "2/s", burst=1, per=["api_key", "agent_id"])
    assert store.admit([key, share], {**KEY, "agent_id": "first"}, now_us=T0)  # key now empty
    runaway = [
        store.admit([key, share], {**KEY, "agent_id": "loop"}, reserve=True, now_us=T0)
        for _ in range(20)
    ]
    assert [d.bound_by for d in runaway[:2]] == ["key", "share"]
    assert all(d.bound_by == "share" for d in runaway[1:])
    # The first booking is at the key's slot (0.1 s), each next one a share's interval later.
    assert runaway[-1].retry_after == pytest.approx(0.1 + 0.5 * 19)
    sibling = store.admit([key, share], {**KEY, "agent_id": "sibling"}, reserve=True, now_us=T0)
    assert sibling.bound_by == "key"
    assert sibling.retry_after == pytest.approx(0.2)
    # The runaway's first booking paid for both of its limits: redeemed, nothing charged.
    back = store.admit(
        [key, share], {**KEY, "agent_id": "loop"}, booking=runaway[0].booking, now_us=T0 + US
    )
    assert back.outcome is Outcome.REDEEMED


def test_a_booking_in_a_global_limit_books_no_tenant_limit(store: BaseStore) -> None:
    """A global limit's booking leaves the tenant's own limits alone, on one server as on a
    cluster (where the global limit lives in a slot of its own)."""
    everyone = Limit("everyone", "10/s", burst=1, per=[])
    key = Limit("key", "1/h", burst=5)
    assert store.admit([everyone, key], KEY, now_us=T0)
    booked = store.admit([everyone, key], KEY, reserve=True, now_us=T0)
    assert booked.outcome is Outcome.BOOKED
    assert booked.bound_by == "everyone"
    left = store.peek([key], KEY, now_us=T0)
    assert left.limits[0].remaining == pytest.approx(4)


def test_early_return_keeps_the_booking(store: BaseStore) -> None:
    """Coming back before the slot changes nothing and repeats the remaining wait."""
    limit = Limit("req", "1/s", burst=1)
    store.admit([limit], KEY, now_us=T0)
    booked = store.admit([limit], KEY, reserve=True, now_us=T0)
    assert booked.retry_after == pytest.approx(1.0)
    early = store.admit([limit], KEY, booking=booked.booking, reserve=True, now_us=T0 + 400_000)
    assert early.outcome is Outcome.EARLY
    assert early.booking == booked.booking
    assert early.retry_after == pytest.approx(0.6)
    assert store.admit([limit], KEY, booking=booked.booking, now_us=T0 + US).allowed


def test_forged_and_replayed_bookings_admit_nothing(store: BaseStore) -> None:
    """A booking id that was never issued, or was already redeemed, buys no capacity."""
    limit = Limit("req", "1/s", burst=1)
    store.admit([limit], KEY, now_us=T0)
    forged = store.admit([limit], KEY, booking="AAAAAAAAAAAAAAAA", now_us=T0)
    assert forged.outcome is Outcome.DENIED
    booked = store.admit([limit], KEY, reserve=True, now_us=T0)
    assert store.admit([limit], KEY, booking=booked.booking, now_us=T0 + US).allowed
    replay = store.admit([limit], KEY, booking=booked.booking, now_us=T0 + US)
    assert replay.outcome is Outcome.DENIED
    other_tenant = store.admit([limit], {"api_key": "other"}, now_us=T0)
    assert other_tenant.outcome is Outcome.ADMITTED  # its own bucket was full
    stolen = store.admit([limit], {"api_key": "other"}, booking=booked.booking, now_us=T0 + US)
    assert stolen.outcome is Outcome.ADMITTED  # charged as fresh: its bucket had refilled
    assert stolen.outcome is not Outcome.REDEEMED
    with pytest.raises(IdentityError, match="booking"):
        store.admit([limit], KEY, booking="{bad}", now_us=T0)


def test_booking_beyond_the_horizon_is_not_made(store: BaseStore) -> None:
    """A slot further away than the horizon is not booked; the horizon is the retry_after."""
    limit = Limit("req", "1/m", burst=1)
    store.admit([limit], KEY, now_us=T0)
    far = store.admit([limit], KEY, reserve=True, horizon=30, now_us=T0)
    assert far.outcome is Outcome.HORIZON
    assert far.retry_after == 30
    assert far.booking is None
    near = store.admit([limit], KEY, reserve=True, horizon=60, now_us=T0)
    assert near.outcome is Outcome.BOOKED  # nothing was held by the refused booking
    assert near.retry_after == pytest.approx(60)


def test_an_abandoned_booking_costs_one_slot(store: BaseStore) -> None:
    """A booking whose owner never returns delays later work by exactly one slot."""
    limit = Limit("req", "10/s", burst=1)
    store.admit([limit], KEY, now_us=T0)
    store.admit([limit], KEY, reserve=True, now_us=T0)  # slot at +0.1 s, never redeemed
    late = store.admit([limit], KEY, now_us=T0 + 150_000)
    assert late.outcome is Outcome.DENIED
    assert late.retry_after == pytest.approx(0.05)
    assert store.admit([limit], KEY, now_us=T0 + 200_000).allowed


def _with_grace(store: BaseStore, grace: float, clock: ManualClock) -> BaseStore:
    """A store of the same kind as ``store``, on the same data, with ``booking_grace``."""
    if isinstance(store, RedisStore):
        return RedisStore(store.client, store.keyspace, booking_grace=grace, clock=clock)
    assert isinstance(store, MemoryStore)
    return MemoryStore(store.keyspace, booking_grace=grace, clock=clock)


def test_copies_back_after_the_grace_are_fresh_arrivals(
    store: BaseStore, clock: ManualClock
) -> None:
    """Twenty copies booked 0.1 s apart all come back 3 s after the first booking, with a
    grace of 0.5 s: every slot is more than the grace ago, so each is checked as a fresh
    arrival (one runs, its bucket having refilled; the rest are booked anew) instead of all
    running at once on their bookings (the booking's key itself still lives: the slot's age is
    what counts). A copy back within the grace redeems."""
    store = _with_grace(store, 0.5, clock)
    limit = Limit("req", "10/s", burst=1)
    assert store.admit([limit], KEY, now_us=T0).allowed
    booked = [store.admit([limit], KEY, reserve=True, now_us=T0) for _ in range(20)]
    assert [b.outcome for b in booked] == [Outcome.BOOKED] * 20  # slots +0.1 s .. +2.0 s
    back = [
        store.admit([limit], KEY, booking=b.booking, reserve=True, now_us=T0 + 3 * US)
        for b in booked
    ]
    assert [d.outcome for d in back] == [Outcome.ADMITTED] + [Outcome.BOOKED] * 19
    assert [round(d.retry_after, 6) for d in back[1:4]] == [0.1, 0.2, 0.3]
    # The second copy's new slot is at +3.1 s: back 0.4 s after it, within the grace.
    again = store.admit([limit], KEY, booking=back[1].booking, now_us=T0 + 3_500_000)
    assert again.outcome is Outcome.REDEEMED
    # Another copy of the batch, back 0.6 s after its new slot (+3.2 s): fresh, and denied,
    # the bucket being booked up to +4.9 s.
    lapsed = store.admit([limit], KEY, booking=back[2].booking, now_us=T0 + 3_800_001)
    assert lapsed.outcome is Outcome.DENIED


@pytest.mark.parametrize("grace", [None, 0.5])
def test_rebooking_in_a_second_limit_keeps_the_first(
    store: BaseStore, clock: ManualClock, grace: float | None
) -> None:
    """Work that returns at its slot but meets another full limit keeps the first booking:
    with a grace of 0.5 s too, although it then comes back a second after its first slot (the
    slot moved to the second one)."""
    if grace is not None:
        store = _with_grace(store, grace, clock)
    agent = Limit("agent", "1/s", burst=1, per=["api_key", "agent_id"])
    key = Limit("key", "1/s", burst=1)
    who = {**KEY, "agent_id": "a"}
    assert store.admit([key, agent], who, now_us=T0).allowed
    first = store.admit([agent], who, reserve=True, now_us=T0)  # agent booked at +1 s
    assert first.outcome is Outcome.BOOKED
    # Meanwhile a sibling uses the key's capacity at the moment the slot comes.
    assert store.admit([key], {**KEY, "agent_id": "b"}, now_us=T0 + US).allowed
    back = store.admit([key, agent], who, booking=first.booking, reserve=True, now_us=T0 + US)
    assert back.outcome is Outcome.BOOKED
    assert back.bound_by == "key"
    assert back.booking == first.booking
    final = store.admit([key, agent], who, booking=first.booking, reserve=True, now_us=T0 + 2 * US)
    assert final.outcome is Outcome.REDEEMED
    agent_state = {s.name: s for s in final.limits}["agent"]
    assert agent_state.remaining == pytest.approx(1.0)  # agent was not charged twice


def test_settle_refunds_and_charges(store: BaseStore) -> None:
    """Settling refunds an over-estimate and charges an under-estimate into debt."""
    tokens = Limit("tokens", "6000/m", burst=1000, unit="tokens")
    first = store.admit([tokens], KEY, cost=800, now_us=T0)
    assert first.limits[0].remaining == 200
    assert first.receipt is not None
    store.settle(first.receipt, {"tokens": 300}, now_us=T0)
    second = store.admit([tokens], KEY, cost=700, now_us=T0)
    assert second.allowed
    assert second.limits[0].remaining == pytest.approx(0, abs=1e-9)
    assert second.receipt is not None
    store.settle(second.receipt, {"tokens": 1500}, now_us=T0)
    # 300 + 1500 = 1800 used of 1000: 800 in debt; at 100/s, 8 s to zero and 0.01 s more for
    # the unit asked for.
    probe = store.admit([tokens], KEY, cost=1, now_us=T0)
    assert probe.outcome is Outcome.DENIED
    assert probe.retry_after == pytest.approx(8.01)
    assert probe.limits[0].remaining == pytest.approx(-800)


def test_refunds_never_rise_above_burst(store: BaseStore) -> None:
    """A refund larger than what the bucket lacks fills it to its burst, no further."""
    tokens = Limit("tokens", "600/m", burst=100, unit="tokens")
    d = store.admit([tokens], KEY, cost=50, now_us=T0)
    assert d.receipt is not None
    store.admit([tokens], KEY, cost=0, now_us=T0 + 60 * US)
    store.settle(d.receipt, {"tokens": 0}, now_us=T0 + 60 * US)
    later = store.admit([tokens], KEY, cost=0, now_us=T0 + 60 * US)
    assert later.limits[0].remaining == 100


def test_settle_rejects_bad_reports(store: BaseStore) -> None:
    """Usage reports that are not finite numbers >= 0, or name other limits, are refused."""
    tokens = Limit("tokens", "600/m", burst=100)
    d = store.admit([tokens], KEY, cost=10, now_us=T0)
    assert d.receipt is not None
    for bad in (-1, math.nan, math.inf, "5", None):
        with pytest.raises(CostError, match="tokens"):
            store.settle(d.receipt, {"tokens": bad}, now_us=T0)  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="other"):
        store.settle(d.receipt, {"other": 1}, now_us=T0)
    assert store.admit([tokens], KEY, cost=0, now_us=T0).limits[0].remaining == 90


def test_zero_cost_checks_without_charging(store: BaseStore) -> None:
    """A cost of 0 reports the bucket without taking from it."""
    limit = Limit("req", "10/s", burst=2)
    for _ in range(3):
        d = store.admit([limit], KEY, cost=0, now_us=T0)
        assert d.allowed
        assert d.limits[0].remaining == 2


def test_peek_tells_the_wait_and_charges_nothing(store: BaseStore) -> None:
    """A peek answers what admitting the cost would do, as often as asked, and takes nothing."""
    req = Limit("req", "10/s", burst=2)
    win = Limit("win", "2/s", algorithm="sliding_window")
    for _ in range(2):
        assert store.admit([req, win], KEY, now_us=T0).allowed
    for _ in range(3):
        seen = store.peek([req, win], KEY, now_us=T0 + 50_000)
        assert seen.outcome is Outcome.DENIED
        assert seen.bound_by == "win"
        assert seen.retry_after == pytest.approx(0.95)
        assert seen.receipt is None
        assert seen.booking is None
        assert [s.name for s in seen.limits] == ["req", "win"]
        assert seen.limits[0].remaining == pytest.approx(0.5)
    assert store.peek([req], KEY, cost=0.5, now_us=T0 + 50_000).allowed
    assert store.admit([req], KEY, cost=0.5, now_us=T0 + 50_000).allowed
    assert not store.admit([req], KEY, cost=0.5, now_us=T0 + 50_000).allowed


def test_reset_refills_one_tenant_for_every_agent(store: BaseStore) -> None:
    """A reset forgets a tenant's buckets, every agent's with them, and nobody else's."""
    req = Limit("req", "1/h", burst=1)
    share = Limit("share", "1/h", burst=1, per=["api_key", "agent_id"])
    win = Limit("win", "1/h", algorithm="sliding_window")
    other = {"api_key": "tenant-2", "agent_id": "a1"}
    for agent in ("a1", "a2"):
        assert store.admit([share, win] if agent == "a1" else [share], {**KEY, "agent_id": agent})
    assert store.admit([req], KEY, now_us=T0)
    assert store.admit([share], other)
    assert store.reset([req, share, win], KEY) >= 4
    for agent in ("a1", "a2"):
        assert store.admit([share, win] if agent == "a1" else [share], {**KEY, "agent_id": agent})
    assert store.admit([req], KEY, now_us=T0)
    assert not store.admit([share], other)
    assert store.reset([share], {**KEY, "agent_id": "a2"}) == 1
    assert store.admit([share], {**KEY, "agent_id": "a2"})
    assert not store.admit([share], {**KEY, "agent_id": "a1"})


def test_counts_add_up_per_minute_of_the_store_clock(store: BaseStore) -> None:
    """Counts added in one minute sum up; the next minute starts its own tally; a bad count is
    refused with the field named."""
    minute = T0 // (60 * US)
    store.add_counts({"k|a": 2, "k|u|tok": 1.5}, retention=3600, now_us=T0)
    store.add_counts({"k|a": 1}, retention=3600, now_us=T0 + 1)
    store.add_counts({"k|a": 5}, retention=3600, now_us=(minute + 1) * 60 * US)
    assert store.counts(3, now_us=(minute + 1) * 60 * US) == [
        ((minute - 1) * 60, {}),
        (minute * 60, {"k|a": 3.0, "k|u|tok": 1.5}),
        ((minute + 1) * 60, {"k|a": 5.0}),
    ]
    with pytest.raises(ConfigurationError, match="counts"):
        store.add_counts({"k|a": -1}, retention=3600)
    with pytest.raises(ConfigurationError, match="minutes"):
        store.counts(0)


def test_per_limit_costs(store: BaseStore) -> None:
    """A cost mapping charges each limit its own units; unnamed limits cost 1."""
    req = Limit("req", "100/m", burst=100)
    tok = Limit("tok", "100000/m", burst=10000, unit="tokens")
    d = store.admit([req, tok], KEY, cost={"tok": 2500}, now_us=T0)
    assert {s.name: s.remaining for s in d.limits} == {"req": 99, "tok": 7500}
    with pytest.raises(ConfigurationError, match="nope"):
        store.admit([req], KEY, cost={"nope": 1}, now_us=T0)
    with pytest.raises(CostError, match="capacity"):
        store.admit([tok], KEY, cost=10001, now_us=T0)


def test_sliding_window_counts_exactly(store: BaseStore) -> None:
    """A sliding window admits its count within any rolling period and frees the oldest first."""
    limit = Limit("win", "3/s", algorithm="sliding_window")
    times = [0, 200_000, 700_000]
    for t in times:
        assert store.admit([limit], KEY, now_us=T0 + t).allowed
    denied = store.admit([limit], KEY, now_us=T0 + 900_000)
    assert denied.outcome is Outcome.DENIED
    assert denied.retry_after == pytest.approx(0.1)  # the entry at 0 leaves the window at 1.0 s
    assert not store.admit([limit], KEY, now_us=T0 + US - 1).allowed
    assert store.admit([limit], KEY, now_us=T0 + US).allowed  # the window is (t - 1 s, t]


def test_sliding_window_with_costs_and_bookings(store: BaseStore) -> None:
    """Window bookings wait for enough old cost to expire, and a window settles exactly."""
    limit = Limit("spend", "100/m", algorithm="sliding_window", unit="cents", max_cost=100)
    first = store.admit([limit], KEY, cost=60, now_us=T0)
    assert store.admit([limit], KEY, cost=30, now_us=T0 + 10 * US).allowed
    booked = store.admit([limit], KEY, cost=50, reserve=True, now_us=T0 + 20 * US)
    assert booked.outcome is Outcome.BOOKED
    assert booked.retry_after == pytest.approx(40)  # the 60 leaves at 60 s
    assert first.receipt is not None
    store.settle(first.receipt, {"spend": 10}, now_us=T0 + 21 * US)
    # 10 + 30 + 50 (booked at 60 s) = 90 counted: 10 more fit now.
    assert store.admit([limit], KEY, cost=10, now_us=T0 + 22 * US).allowed
    assert not store.admit([limit], KEY, cost=1, now_us=T0 + 22 * US).allowed
    back = store.admit([limit], KEY, cost=50, booking=booked.booking, now_us=T0 + 60 * US)
    assert back.outcome is Outcome.REDEEMED


def test_a_hand_over_recorded_before_publishing_leaves_one_live_copy(store: BaseStore) -> None:
    """Work that was admitted and then deferred anyway (the provider refused its call) records
    the hand-over "<token>><next>" itself before publishing the next copy: after a crash, the
    copy that comes first owns the work and the other is stale."""
    limit = Limit("req", "10/s", burst=10)
    assert store.admit([limit], KEY, guard=Guard("w", None, "t2"), now_us=T0).allowed
    store.set_guard([limit], KEY, Guard("w", "->t2"), ttl=60)  # fresh work: its token is "-"
    assert store.admit([limit], KEY, guard=Guard("w", "t2", "t3"), now_us=T0).allowed
    stale = store.admit([limit], KEY, guard=Guard("w", None, "t9"), now_us=T0)
    assert stale.outcome is Outcome.STALE  # the redelivered old copy


def test_a_single_limit_needs_no_list(store: BaseStore) -> None:
    """A lone Limit is taken as a list of one, by admissions and by upstream feedback."""
    limit = Limit("req", "10/s", burst=10)
    assert store.admit(limit, KEY, now_us=T0).limits[0].remaining == 9  # type: ignore[arg-type]
    store.upstream_throttled(limit, KEY, remaining={"req": 2}, adaptive=False, now_us=T0)  # type: ignore[arg-type]
    assert store.admit(limit, KEY, now_us=T0).limits[0].remaining == 1  # type: ignore[arg-type]


def test_admission_arguments_are_checked(store: BaseStore) -> None:
    """Empty or duplicate limit lists and bad horizons are errors, not silent passes."""
    limit = Limit("req", "1/s")
    with pytest.raises(ConfigurationError, match="at least one"):
        store.admit([], KEY)
    with pytest.raises(ConfigurationError, match="twice"):
        store.admit([limit, limit], KEY)
    with pytest.raises(ConfigurationError, match="horizon"):
        store.admit([limit], KEY, horizon=-1)
    with pytest.raises(ConfigurationError, match="identity"):
        store.admit([limit], "tenant")  # type: ignore[arg-type]


def test_a_repeated_admission_is_checked_like_the_first(store: BaseStore) -> None:
    """Admissions remember what their limits, identity and costs come to; values that compare
    equal to remembered ones but mean something else are still told apart: a bool cost is an
    error, a Fingerprint is not the string it is spelt as, a long key is its own bucket."""
    limit = Limit("req", "10/s", burst=10)
    tokens = Limit("tokens", "1000/s", burst=1000)
    for _ in range(2):
        assert store.admit([limit], KEY, cost=1, now_us=T0).allowed
        assert store.admit([limit, tokens], KEY, cost={"tokens": 5}, now_us=T0).allowed
    with pytest.raises(CostError):
        store.admit([limit], KEY, cost=True, now_us=T0)
    with pytest.raises(CostError):
        store.admit([limit, tokens], KEY, cost={"tokens": True}, now_us=T0)
    with pytest.raises(CostError):
        store.admit([limit, tokens], KEY, cost={"tokens": 5000}, now_us=T0)
    spelt = store.keyspace.fingerprint("api_key", KEY["api_key"])
    assert store.admit([limit], {"api_key": spelt}, now_us=T0).limits[0].remaining == 9
    assert store.admit([limit], {"api_key": Fingerprint(spelt)}, now_us=T0).limits[0].remaining == 5
    long_key = "k" * 1000
    for left in (9, 8):
        assert store.admit([limit], {"api_key": long_key}, now_us=T0).limits[0].remaining == left
    assert store.admit([limit], KEY, now_us=T0).limits[0].remaining == 4


def test_redis_keys_expire_when_full_again(redis_client: redis.Redis, keyspace: Keyspace) -> None:
    """Every key's TTL is the time until its bucket is full again plus a margin."""
    store = RedisStore(redis_client, keyspace, booking_grace=30)
    bucket = Limit("req", "10/s", burst=10)
    window = Limit("win", "5/m", algorithm="sliding_window")
    for _ in range(4):
        store.admit([bucket, window], KEY)
    booked = store.admit([Limit("slow", "1/h", burst=1)], KEY)
    booked = store.admit([Limit("slow", "1/h", burst=1)], KEY, reserve=True)
    assert booked.outcome is Outcome.BOOKED
    ttls = {k.decode(): redis_client.pttl(k) for k in redis_client.keys("*")}
    by_kind = {
        ("window" if ":win" in k else "booking" if ":~b:" in k else k.rsplit(":", 1)[1]): v
        for k, v in ttls.items()
    }
    # Token buckets: the time to full, + 1 s margin, rounded up to ten seconds of the clock.
    assert 1300 < by_kind["req"] <= 11_400  # 0.4 s to full + 1 s margin, + up to 10 s
    assert 60_000 < by_kind["window"] <= 61_000  # newest entry leaves in 60 s, + margin
    assert 7_100_000 < by_kind["slow"] <= 7_211_000  # one hour charged, one hour booked
    assert 3_630_000 - 5_000 < by_kind["booking"] <= 3_631_000  # slot + grace + margin


def test_a_busy_bucket_keeps_its_expiry_within_the_step(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """A token bucket's key expires 1 s after the bucket is full again, rounded up to ten
    seconds; a write that leaves that moment where it was keeps the expiry already set (the
    cheaper write), one that moves it sets it anew. Admissions and settlements alike."""
    store = RedisStore(redis_client, keyspace)
    limit = Limit("req", "1000/s", burst=1000)  # each admission: 1 ms
    start = T0 - T0 % 10_000_000  # a multiple of ten seconds
    key = store.charges([limit], KEY)[0].bucket.key

    first = store.admit([limit], KEY, now_us=start)  # full at +1 ms: expires at +10 s
    assert 9900 < redis_client.pttl(key) <= 10_000
    assert first.receipt is not None
    store.admit([limit], KEY, now_us=start + 6_000_000)  # full at +6.001 s: still +10 s
    # Kept: set anew it would be 10 - 6 s from the (test's) clock.
    assert 9900 < redis_client.pttl(key) <= 10_000
    store.settle(first.receipt, {"req": 3}, now_us=start + 7_000_000)  # full at about +7 s
    assert 9900 < redis_client.pttl(key) <= 10_000
    store.admit([limit], KEY, now_us=start + 9_500_000)  # full at +9.501 s: expires at +20 s
    assert 10_400 < redis_client.pttl(key) <= 10_500


def test_memory_store_forgets_idle_buckets(keyspace: Keyspace, clock: ManualClock) -> None:
    """The in-process store drops a bucket once it is full again, as Redis expiry does."""
    store = MemoryStore(keyspace, clock=clock)
    limit = Limit("req", "10/s", burst=10)
    assert clock.now_us() % 10_000_000 == 0  # (the expiry steps are whole ten seconds)
    store.admit([limit], KEY)  # full again at +0.1 s, expires at +10 s
    assert len(store.keys()) == 1
    clock.advance(1.0)
    assert len(store.keys()) == 1  # full again, but within the margin
    clock.advance(8.9)
    assert len(store.keys()) == 1  # and within the step it is rounded up to
    clock.advance(0.1)
    assert store.keys() == []


def test_guard_drops_stale_twins(store: BaseStore) -> None:
    """After a guard names the live copy, other copies are STALE and charge nothing."""
    limit = Limit("req", "10/s", burst=10)
    assert store.admit([limit], KEY, guard=Guard("task-1", None), now_us=T0).allowed
    store.set_guard([limit], KEY, Guard("task-1", "t2"), ttl=60)
    for token in (None, "t1"):
        stale = store.admit([limit], KEY, guard=Guard("task-1", token), now_us=T0)
        assert stale.outcome is Outcome.STALE
        assert not stale.allowed
    live = store.admit([limit], KEY, guard=Guard("task-1", "t2"), now_us=T0)
    assert live.allowed
    assert live.limits[0].remaining == 8  # the stale copies took nothing
    other = store.admit([limit], KEY, guard=Guard("task-2", "t9"), now_us=T0)
    assert other.allowed  # no guard stored for that work: not stale


def test_a_half_done_deferral_is_owned_by_the_first_copy(store: BaseStore) -> None:
    """A denial that names the next token records the hand-over; whichever copy (old or new)
    comes first owns the work and the other is then stale; unrelated copies are stale at once."""
    limit = Limit("req", "1/s", burst=1)
    assert store.admit([limit], KEY, now_us=T0).allowed  # empty the bucket
    denied = store.admit([limit], KEY, guard=Guard("w", None, "t2"), reserve=True, now_us=T0)
    assert denied.outcome is Outcome.BOOKED
    # The publisher crashed before recording t2: both the old copy (no token) and t2 exist.
    assert store.admit([limit], KEY, guard=Guard("w", "t9"), now_us=T0).outcome is Outcome.STALE
    new = store.admit([limit], KEY, guard=Guard("w", "t2"), booking=denied.booking, now_us=T0 + US)
    assert new.outcome is Outcome.REDEEMED
    old = store.admit([limit], KEY, guard=Guard("w", None), now_us=T0 + 2 * US)
    assert old.outcome is Outcome.STALE  # the new copy claimed the work


def test_a_returning_old_copy_keeps_the_work_from_the_late_recording(store: BaseStore) -> None:
    """The old copy comes back (its acknowledgement was lost with the broker) and is admitted
    before the deferring worker records its new copy as the live one: that late recording
    must not hand the work to the new copy, or both would run."""
    limit = Limit("req", "1/s", burst=1)
    assert store.admit([limit], KEY, now_us=T0).allowed  # empty the bucket
    denied = store.admit([limit], KEY, guard=Guard("w", "t1", "t2"), reserve=True, now_us=T0)
    assert denied.outcome is Outcome.BOOKED
    old = store.admit([limit], KEY, guard=Guard("w", "t1"), now_us=T0 + 2 * US)
    assert old.allowed  # the old copy claims the work
    recorded = store.set_guard([limit], KEY, Guard("w", "t2", after="t1>t2"), ttl=60)
    assert recorded is False
    new = store.admit([limit], KEY, guard=Guard("w", "t2"), now_us=T0 + 4 * US)
    assert new.outcome is Outcome.STALE
    # Without the race the hand-over completes; and with no guard stored (the store lost its
    # data) the recording goes through too.
    assert store.admit([limit], KEY, now_us=T0 + 4 * US).allowed  # empty the bucket
    later = store.admit(
        [limit], KEY, guard=Guard("v", "t1", "t2"), reserve=True, now_us=T0 + 4 * US
    )
    assert later.outcome is Outcome.BOOKED
    assert store.set_guard([limit], KEY, Guard("v", "t2", after="t1>t2"), ttl=60) is True
    assert store.set_guard([limit], KEY, Guard("u", "t2", after="t1>t2"), ttl=60) is True
    assert store.admit([limit], KEY, guard=Guard("v", "t1"), now_us=T0 + 6 * US).outcome is (
        Outcome.STALE
    )


def test_a_copy_published_twice_runs_once(store: BaseStore) -> None:
    """A broker that fails while a deferred copy is published can be left with two messages of
    that copy (one token). Once one is admitted, the other (same retry count, not
    redelivered) is STALE and charges nothing, its booking or not; a message the broker
    redelivered (its holder may have died before running it), a Celery retry of the copy (a
    higher retry count) and the copy deferred again as it is (a higher deferral count) are
    admitted; the copy that ran still closes its guard."""
    limit = Limit("req", "10/s", burst=10)
    store.set_guard([limit], KEY, Guard("w", "t2"), ttl=60)
    first = store.admit([limit], KEY, guard=Guard("w", "t2", "t3"), now_us=T0)
    assert first.allowed
    twin = store.admit([limit], KEY, guard=Guard("w", "t2", "t4"), now_us=T0)
    assert twin.outcome is Outcome.STALE
    again = store.admit([limit], KEY, guard=Guard("w", "t2", redelivered=True), now_us=T0)
    assert again.allowed
    retry = store.admit([limit], KEY, guard=Guard("w", "t2", retries=1), now_us=T0)
    assert retry.allowed
    assert retry.limits[0].remaining == 7  # the twin took nothing
    twin = store.admit([limit], KEY, guard=Guard("w", "t2", retries=1), now_us=T0)
    assert twin.outcome is Outcome.STALE  # the retry's own twin
    # Deferred again as it is (the answer to its admission was lost while the store did not
    # answer): the next message counts one deferral more, and is not a twin.
    moved = store.admit([limit], KEY, guard=Guard("w", "t2", retries=1, deferrals=1), now_us=T0)
    assert moved.allowed
    assert moved.receipt is not None
    assert store.close_guard(moved.receipt.charges, "w", "t2", ttl=60) is True
    done = store.admit([limit], KEY, guard=Guard("w", "t2", redelivered=True), now_us=T0)
    assert done.outcome is Outcome.STALE
    # Both messages of a booked copy come back at its slot: one redeems, the other is a twin.
    assert store.admit([limit], {"api_key": "busy"}, cost=10, now_us=T0).allowed
    booked = store.admit(
        [limit], {"api_key": "busy"}, guard=Guard("v", None, "t7"), reserve=True, now_us=T0
    )
    assert booked.outcome is Outcome.BOOKED
    store.set_guard([limit], {"api_key": "busy"}, Guard("v", "t7", after="->t7"), ttl=60)
    at_slot = T0 + round(booked.retry_after * US)
    one = store.admit(
        [limit], {"api_key": "busy"}, guard=Guard("v", "t7"), booking=booked.booking, now_us=at_slot
    )
    assert one.outcome is Outcome.REDEEMED
    other = store.admit(
        [limit], {"api_key": "busy"}, guard=Guard("v", "t7"), booking=booked.booking, now_us=at_slot
    )
    assert other.outcome is Outcome.STALE


def test_an_admission_sent_again_is_not_its_own_twin(store: BaseStore) -> None:
    """A client that lost the answer to an admission (a timeout, a connection reset: a cluster
    client then sends the command again) runs the same call twice: the second run finds the
    copy recorded as admitted by that very call, and admits it again rather than dropping it."""
    limit = Limit("req", "10/s", burst=10)
    store.set_guard([limit], KEY, Guard("w", "t2"), ttl=60)
    prepared = store.prepare([limit], KEY, guard=Guard("w", "t2", "t3"), now_us=T0)
    if not isinstance(prepared, Prepared):
        pytest.skip("an admission that spans slots is not one prepared call")
    assert store.finish(prepared, store._run_prepared(prepared)).allowed
    assert store.finish(prepared, store._run_prepared(prepared)).allowed
    twin = store.admit([limit], KEY, guard=Guard("w", "t2", "t4"), now_us=T0)
    assert twin.outcome is Outcome.STALE


def test_a_copy_a_later_slot_denies_stays_the_live_one(store: BaseStore) -> None:
    """On Redis Cluster a global limit is admitted in a second call, after the tenant's slot
    admitted. When the global limit denies (or does not answer), the copy is deferred as it is:
    it must stay the live copy, so that it is admitted when it returns. Only once every slot
    admitted is it recorded as admitted."""
    glob = Limit("all", "1/s", burst=1, per=[])
    mine = Limit("mine", "10/s", burst=10)
    store.set_guard([glob, mine], KEY, Guard("w", "t2"), ttl=60)
    assert store.admit([glob], {"api_key": "other"}, now_us=T0).allowed  # global bucket empty
    denied = store.admit([glob, mine], KEY, guard=Guard("w", "t2"), now_us=T0)
    assert denied.outcome is Outcome.DENIED
    back = store.admit([glob, mine], KEY, guard=Guard("w", "t2"), now_us=T0 + US)
    assert back.allowed
    # Admitted in every slot, it is recorded as admitted: a second message of it is a twin.
    twin = store.admit([glob, mine], KEY, guard=Guard("w", "t2"), now_us=T0 + 3 * US)
    assert twin.outcome is Outcome.STALE


def test_work_done_makes_every_later_copy_stale(store: BaseStore) -> None:
    """Once the live copy has done the work, that copy redelivered (its acknowledgement lost)
    is stale like any other; a copy that is not the live one cannot close the guard."""
    limit = Limit("req", "10/s", burst=10)
    store.admit([limit], KEY, guard=Guard("w", None, "t2"), now_us=T0)  # admitted: no record
    store.set_guard([limit], KEY, Guard("w", "t2"), ttl=60)
    live = store.admit([limit], KEY, guard=Guard("w", "t2"), now_us=T0)
    assert live.allowed
    assert live.receipt is not None
    assert store.close_guard(live.receipt.charges, "w", "t9", ttl=60) is False
    assert store.close_guard(live.receipt.charges, "w", "t2", ttl=60) is True
    for token in ("t2", None, "t9"):
        again = store.admit([limit], KEY, guard=Guard("w", token), now_us=T0)
        assert again.outcome is Outcome.STALE


def test_guard_and_booking_keys_follow_the_tenant_whatever_the_order(store: BaseStore) -> None:
    """With a global limit listed first, the guard recorded by set_guard is the one the next
    admission checks, and a booking made then is redeemed (keys under the tenant's tag)."""
    glob = Limit("all", "1/s", burst=1, per=[])
    mine = Limit("mine", "10/s", burst=10)
    limits = [glob, mine]
    assert store.admit(limits, KEY, guard=Guard("w", None), now_us=T0).allowed
    store.set_guard(limits, KEY, Guard("w", "t2"), ttl=60)
    assert store.admit(limits, KEY, guard=Guard("w", None), now_us=T0).outcome is Outcome.STALE
    booked = store.admit(limits, KEY, guard=Guard("w", "t2"), reserve=True, now_us=T0)
    assert booked.outcome is Outcome.BOOKED
    back = store.admit(limits, KEY, guard=Guard("w", "t2"), booking=booked.booking, now_us=T0 + US)
    assert back.outcome is Outcome.REDEEMED
