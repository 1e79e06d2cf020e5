# SPDX-License-Identifier: MIT
"""The adaptive factors in the store: the cluster-wide load factor (hysteresis, floor, override,
lapse), the tenants' upstream factors (decrease, recovery, pauses, following the provider down),
and admissions that apply them, on Redis, Redis Cluster and in memory."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import T0
from throttle import ConfigurationError, Keyspace, Limit, MemoryStore, Outcome, RedisStore
from throttle.store.base import BaseStore, LoadFactor
from throttle.testing import ManualClock

US = 1_000_000
KEY = {"api_key": "tenant-1"}
OTHER = {"api_key": "tenant-2"}


def _admitted(
    store: BaseStore, limits: list[Limit], identity: dict[str, str], at: int, adaptive: bool = True
) -> int:
    """How many admissions pass back to back at one moment."""
    count = 0
    while store.admit(limits, identity, adaptive=adaptive, now_us=at).allowed:
        count += 1
        assert count < 1000
    return count


def _fresh_factor(store: BaseStore, clock: ManualClock) -> None:
    """On a cluster, admissions use the load factor as last read: let it be read again."""
    clock.advance(5.0)


def test_load_factor_falls_at_once_and_rises_a_step_per_period(store: BaseStore) -> None:
    """Hysteresis: a lower target applies at once, a higher one one step per relax period,
    counted from the last change; never below the floor; never above the target."""
    kw = {"floor": 0.1, "step": 0.25, "relax": 5.0, "ttl": 3600.0}
    assert store.report_load(0.25, now_us=T0, **kw) == LoadFactor(0.25, 0.25, None)
    assert store.report_load(1.0, now_us=T0 + 4 * US, **kw).in_force == 0.25
    assert store.report_load(1.0, now_us=T0 + 5 * US, **kw).in_force == 0.5
    assert store.report_load(1.0, now_us=T0 + 9 * US, **kw).in_force == 0.5
    assert store.report_load(0.6, now_us=T0 + 10 * US, **kw).in_force == 0.6  # capped by target
    assert store.report_load(0.0, now_us=T0 + 11 * US, **kw).in_force == 0.1  # the floor
    assert store.report_load(1.0, now_us=T0 + 16 * US, **kw).in_force == pytest.approx(0.35)
    assert store.load_factor(now_us=T0 + 16 * US).computed == pytest.approx(0.35)


def test_override_wins_until_cleared(store: BaseStore) -> None:
    """An operator's factor is in force whatever workers report, and clearing it brings the
    computed factor back."""
    kw = {"floor": 0.1, "step": 0.25, "relax": 5.0, "ttl": 3600.0}
    store.report_load(0.5, now_us=T0, **kw)
    assert store.override_load_factor(0.2, now_us=T0) == LoadFactor(0.2, 0.5, 0.2)
    assert store.report_load(0.25, now_us=T0 + US, **kw) == LoadFactor(0.2, 0.25, 0.2)
    assert store.override_load_factor(None, now_us=T0 + US) == LoadFactor(0.25, 0.25, None)
    with pytest.raises(ConfigurationError, match="factor"):
        store.override_load_factor(0)
    with pytest.raises(ConfigurationError, match="target"):
        store.report_load(1.5)
    with pytest.raises(ConfigurationError, match="floor"):
        store.report_load(0.5, floor=0)


def test_the_load_factor_lapses_when_nobody_reports(keyspace: Keyspace) -> None:
    """Without reports for ttl seconds the computed factor is 1 again (a dead cluster does not
    stay throttled); an override does not lapse."""
    clock = ManualClock(T0)
    store = MemoryStore(keyspace, clock=clock)
    store.report_load(0.25, ttl=5.0)
    clock.advance(4.9)
    assert store.load_factor().in_force == 0.25
    clock.advance(0.2)
    assert store.load_factor() == LoadFactor(1.0, 1.0, None)
    store.override_load_factor(0.5)
    clock.advance(3600)
    assert store.load_factor().in_force == 0.5


def test_the_load_factor_keys_expire_in_redis(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """In Redis the computed factor and its state carry the ttl; the override carries none."""
    store = RedisStore(redis_client, keyspace)
    store.report_load(0.5, ttl=7.0)
    assert 6000 < redis_client.pttl(keyspace.load_factor_key()) <= 7000
    assert 6000 < redis_client.pttl(keyspace.load_state_key()) <= 7000
    store.override_load_factor(0.3)
    assert redis_client.pttl(keyspace.load_factor_key()) == -1
    assert redis_client.pttl(keyspace.load_override_key()) == -1


def test_adaptive_admissions_follow_the_load_factor(store: BaseStore, clock: ManualClock) -> None:
    """At factor 0.5 an adaptive token bucket grants half its burst and refills at half its
    rate; a window admits half its count; a limit with adaptive=False and an admission that
    does not ask for the factors are unchanged."""
    bucket = Limit("req", "10/s", burst=10)
    window = Limit("win", "8/m", algorithm="sliding_window", per=["api_key", "agent_id"])
    fixed = Limit("fixed", "10/s", burst=10, adaptive=False, per=["api_key", "tier"])
    store.report_load(0.5, now_us=T0)
    _fresh_factor(store, clock)
    assert _admitted(store, [bucket], KEY, T0) == 5
    denied = store.admit([bucket], KEY, adaptive=True, now_us=T0)
    assert denied.retry_after == pytest.approx(0.2)  # 1 / (10/s * 0.5)
    assert store.admit([bucket], OTHER, now_us=T0).limits[0].remaining == 9  # not adaptive
    assert _admitted(store, [window], KEY, T0) == 4
    assert _admitted(store, [fixed], KEY, T0) == 10


def test_a_global_limit_follows_the_load_factor_only(store: BaseStore, clock: ManualClock) -> None:
    """A limit shared by every tenant tightens with the load, not with one tenant's upstream
    factor."""
    shared = Limit("all", "100/s", burst=8, per=[])
    store.report_load(0.5, now_us=T0)
    store.upstream_throttled([shared], KEY, now_us=T0)
    _fresh_factor(store, clock)
    assert _admitted(store, [shared], KEY, T0) == 4


def test_upstream_throttling_pauses_the_tenant_and_halves_its_rate(store: BaseStore) -> None:
    """A 429 with a 2 s delay: nothing of that tenant passes for 2 s, then one unit, then the
    bucket refills at the rate times the halved upstream factor; other tenants are untouched,
    and successes bring the factor back to 1."""
    limit = Limit("req", "10/s", burst=10)
    assert store.admit([limit], KEY, adaptive=True, now_us=T0).allowed
    assert store.upstream_throttled([limit], KEY, delay=2.0, now_us=T0) == 0.5
    denied = store.admit([limit], KEY, adaptive=True, now_us=T0)
    assert denied.outcome is Outcome.DENIED
    assert denied.retry_after == pytest.approx(2.0)
    assert not store.admit([limit], KEY, adaptive=True, now_us=T0 + 2 * US - 1).allowed
    assert store.admit([limit], KEY, adaptive=True, now_us=T0 + 2 * US).allowed
    again = store.admit([limit], KEY, adaptive=True, now_us=T0 + 2 * US)
    assert again.retry_after == pytest.approx(0.2)  # 0.1 s at the full rate, 0.2 s at half
    assert _admitted(store, [limit], OTHER, T0) == 10
    # The 429s of calls already in flight belong to the same episode: one cut per hold (the
    # delay, 2 s here; at least 1 s), then the next cut; after a cut with hold=0 the next one
    # cuts at once.
    assert store.upstream_throttled([limit], KEY, now_us=T0 + US) == 0.5
    assert store.upstream_throttled([limit], KEY, now_us=T0 + 2 * US) == 0.25
    assert store.upstream_throttled([limit], KEY, now_us=T0 + 2 * US) == 0.25
    assert store.upstream_throttled([limit], KEY, hold=0, now_us=T0 + 3 * US) == 0.125
    assert store.upstream_throttled([limit], KEY, floor=0.1, now_us=T0 + 3 * US) == 0.1
    # Successes do not raise it during the last cut's hold (until T0 + 4 s), then they do.
    assert store.upstream_ok(KEY, successes=10, step=0.05, now_us=T0 + 3 * US) == 0.1
    assert store.upstream_ok(KEY, successes=10, step=0.05, now_us=T0 + 4 * US) == pytest.approx(0.6)
    assert store.upstream_ok(KEY, successes=10, step=0.05, now_us=T0 + 4 * US) == 1.0


def test_after_a_cut_successes_wait_out_the_quiet_period(store: BaseStore) -> None:
    """With quiet=10, the backlog booked right after a cut is booked at the lower rate: the
    factor rises only 10 s after the cut's hold ends."""
    limit = Limit("req", "10/s", burst=10)
    assert store.upstream_throttled([limit], KEY, delay=1.0, quiet=10.0, now_us=T0) == 0.5
    for at in (2, 5, 10.9):
        assert store.upstream_ok(KEY, successes=5, quiet=10.0, now_us=T0 + round(at * US)) == 0.5
    assert store.upstream_ok(KEY, successes=5, quiet=10.0, now_us=T0 + 11 * US) == 0.75


def test_the_bucket_follows_the_provider_down(store: BaseStore) -> None:
    """When the provider says 3 remain, exactly 3 pass now (counted at the tenant's factor), in
    a token bucket and a window; saying more remain than the bucket holds changes nothing."""
    bucket = Limit("req", "10/s", burst=10)
    window = Limit("win", "10/m", algorithm="sliding_window")
    store.upstream_ok(KEY, limits=[bucket, window], remaining={"req": 3, "win": 20}, now_us=T0)
    assert _admitted(store, [bucket], KEY, T0) == 3
    assert _admitted(store, [window], KEY, T0) == 10
    throttled = store.upstream_throttled(
        [bucket, window], OTHER, remaining={"req": 2, "win": 2}, now_us=T0
    )
    assert throttled == 0.5
    assert _admitted(store, [bucket], OTHER, T0) == 2
    assert _admitted(store, [window], OTHER, T0) == 2


def test_a_paused_window_reopens_when_the_pause_ends(store: BaseStore) -> None:
    """A sliding window paused for 5 s admits nothing until then, then its count at the
    tenant's factor (6 * 0.5)."""
    window = Limit("win", "6/m", algorithm="sliding_window")
    store.upstream_throttled([window], KEY, delay=5.0, now_us=T0)
    denied = store.admit([window], KEY, adaptive=True, now_us=T0)
    assert denied.retry_after == pytest.approx(5.0)
    assert not store.admit([window], KEY, adaptive=True, now_us=T0 + 5 * US - 1).allowed
    assert _admitted(store, [window], KEY, T0 + 5 * US) == 3


def test_upstream_arguments_are_checked(store: BaseStore) -> None:
    """Bad delays, factors and remaining counts are errors naming the argument."""
    limit = Limit("req", "10/s")
    with pytest.raises(ConfigurationError, match="delay"):
        store.upstream_throttled([limit], KEY, delay=-1)
    with pytest.raises(ConfigurationError, match="decrease"):
        store.upstream_throttled([limit], KEY, decrease=1.5)
    with pytest.raises(ConfigurationError, match="remaining"):
        store.upstream_throttled([limit], KEY, remaining={"req": float("nan")})
    with pytest.raises(ConfigurationError, match="remaining"):
        store.upstream_throttled([limit], KEY, remaining={"other": 1})
    with pytest.raises(ConfigurationError, match="successes"):
        store.upstream_ok(KEY, successes=-1)


def test_a_pause_of_a_bucket_smaller_than_one_unit_ends_on_time(store: BaseStore) -> None:
    """A bucket whose burst is below one unit is paused exactly as long as asked."""
    half = Limit("half", "1/s", burst=0.5, max_cost=0.5)
    store.upstream_throttled([half], KEY, delay=1.0, adaptive=False, now_us=T0)
    assert store.admit([half], KEY, cost=0.5, now_us=T0).retry_after == 1.0
    assert store.admit([half], KEY, cost=0.5, now_us=T0 + US).allowed


def test_a_pause_and_a_remaining_count_together(store: BaseStore) -> None:
    """Said at once, the later of a pause and a remaining count holds; a limit left out of
    ``paused`` only follows its remaining count."""
    req = Limit("req", "10/s", burst=10)
    tok = Limit("tok", "100/s", burst=100)
    store.upstream_throttled(
        [req, tok],
        KEY,
        delay=1.0,
        remaining={"req": 5, "tok": 30},
        paused=["req"],
        adaptive=False,
        now_us=T0,
    )
    assert store.admit([req], KEY, now_us=T0).retry_after == 1.0
    assert _admitted(store, [tok], KEY, T0, adaptive=False) == 30
    with pytest.raises(ConfigurationError, match="paused"):
        store.upstream_throttled([req], KEY, delay=1.0, paused=["tok"])


def test_a_cost_the_bucket_holds_stays_admissible_at_any_factor(
    store: BaseStore, clock: ManualClock
) -> None:
    """At factor 0.5 a bucket of burst 1 still admits a cost of 1, at half the rate, instead
    of denying it for ever."""
    single = Limit("one", "1/s", burst=1)
    store.override_load_factor(0.5, now_us=T0)
    _fresh_factor(store, clock)
    assert store.admit([single], KEY, adaptive=True, now_us=T0).allowed
    denied = store.admit([single], KEY, adaptive=True, now_us=T0 + US)
    assert denied.retry_after == pytest.approx(1.0)  # 2 s apart at half the rate
    assert store.admit([single], KEY, adaptive=True, now_us=T0 + 2 * US).allowed


def test_a_report_that_changes_nothing_keeps_the_factor_lapsing(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """report_upstream's follow-down (successes=0) does not refresh the cut factor's lifetime:
    with no real news the factor still goes back to 1 when its ttl runs out."""
    store = RedisStore(redis_client, keyspace)
    limit = Limit("req", "10/s", burst=10)
    store.upstream_throttled([limit], KEY, ttl=100.0)
    key = keyspace.upstream_key(keyspace.tenant_tag(KEY))
    assert 99_000 < redis_client.pttl(key) <= 100_000
    store.upstream_ok(KEY, successes=0, limits=[limit], remaining={"req": 5}, ttl=3600.0)
    assert redis_client.pttl(key) <= 100_000


def test_settlement_and_refunds_follow_the_factor(store: BaseStore, clock: ManualClock) -> None:
    """Under factor 0.25 an estimate of 2 settled at 0 gives the whole charge back (2.5 units
    free again, a quarter of the burst of 10); and when a global limit denies, the tenant's
    charge is given back whole too (on a cluster that is a refund in another slot)."""
    tokens = Limit("tok", "10/s", burst=10)
    shared = Limit("all", "1/h", burst=1, per=[], adaptive=False)
    store.override_load_factor(0.25, now_us=T0)
    _fresh_factor(store, clock)
    admitted = store.admit([tokens], KEY, cost=2, adaptive=True, now_us=T0)
    assert admitted.limits[0].remaining == pytest.approx(0.5)
    assert admitted.receipt is not None
    assert admitted.receipt.adaptive
    store.settle(admitted.receipt, {"tok": 0}, now_us=T0)
    probe = store.admit([tokens], KEY, cost=0, adaptive=True, now_us=T0)
    assert probe.limits[0].remaining == pytest.approx(2.5)
    assert store.admit([shared], OTHER, now_us=T0).allowed  # the shared bucket is now empty
    denied = store.admit([tokens, shared], KEY, cost={"tok": 2}, adaptive=True, now_us=T0)
    assert not denied.allowed
    probe = store.admit([tokens], KEY, cost=0, adaptive=True, now_us=T0)
    assert probe.limits[0].remaining == pytest.approx(2.5)
