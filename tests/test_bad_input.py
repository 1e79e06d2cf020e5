# SPDX-License-Identifier: MIT
"""Bad input, wherever it enters: settings, task options, identities, costs and usage reports,
message headers, and the provider's rate-limit headers.

What a user writes (settings, options, costs, usage reports) is refused with an error that names
what was wrong. What comes from outside (message headers, identities in arguments, a provider's
answers) is fingerprinted, checked, cut or ignored. Never a traceback from deep inside, never a
Redis error, never a bucket charged for nothing or charged for someone else."""

from __future__ import annotations

import itertools
import math
import re
import threading
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime
from fractions import Fraction
from typing import Any

import pytest
import redis
import redis.cluster
from celery import Celery
from celery.signals import task_postrun
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import throttle
from tests.conftest import SECRET, T0, TIMEOUT, make_app
from tests.redis_servers import RedisServer
from throttle import (
    ConfigurationError,
    CostError,
    IdentityError,
    Keyspace,
    Limit,
    MemoryStore,
    Outcome,
    RedisStore,
    UpstreamThrottled,
    signals,
)
from throttle.adaptive import parse_headers
from throttle.adaptive.upstream import DEFAULT_MAX_DELAY
from throttle.adaptive.upstream import MAX_SPAN as PROVIDER_SPAN
from throttle.celeryext import headers as H
from throttle.celeryext.settings import (
    _ADAPTIVE_KEYS,
    _LIMIT_KEYS,
    KNOWN,
    ThrottleSettings,
    load_settings,
)
from throttle.identity import Fingerprint
from throttle.limits import BUILTIN_DIMENSIONS, MAX_SPAN, MAX_UNITS, MIN_FACTOR
from throttle.store.base import BaseStore

KEY = {"api_key": "tenant-1"}
_examples = itertools.count()
#: Settings every example starts from: a Redis broker, a secret and one limit.
BASE: dict[str, Any] = {
    "broker_url": "redis://127.0.0.1:6379/0",
    "throttle_key_secret": SECRET,
    "throttle_limits": {"llm": {"rate": "100/m", "burst": 20}},
}
FEW = settings(max_examples=25, deadline=None)
#: For tests over the ``store`` fixture: every example takes a ``fresh`` store of its own, so
#: sharing the fixture across examples shares no state.
FEW_WITH_FIXTURES = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def conf_of(**conf: Any) -> Any:
    """The ``conf`` of a fresh app: ``BASE`` with ``conf`` on top."""
    app = Celery("bad-input", set_as_current=False)
    app.conf.update({**BASE, **conf})
    return app.conf


def fresh(store: BaseStore) -> BaseStore:
    """A store of the same kind as ``store`` (same client, same clock) under a prefix of its
    own: each hypothesis example starts from empty buckets."""
    keyspace = Keyspace(SECRET, prefix=f"bad{next(_examples)}")
    if isinstance(store, RedisStore):
        return RedisStore(store.client, keyspace, clock=store.clock)
    assert isinstance(store, MemoryStore)
    return MemoryStore(keyspace, clock=store.clock)


def keys_of(store: BaseStore) -> list[str]:
    """Every key ``store`` holds under its prefix, on every node."""
    prefix = store.keyspace.prefix
    if isinstance(store, MemoryStore):
        live = store.keys()
        return [k for k in live if k.startswith(prefix + ":")]
    assert isinstance(store, RedisStore)
    client: Any = store.client
    if isinstance(client, redis.cluster.RedisCluster):
        found = client.keys(f"{prefix}:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        found = client.keys(f"{prefix}:*")
    return [k.decode() if isinstance(k, bytes) else k for k in found]


def remaining(store: BaseStore, limits: list[Limit], who: dict[str, object]) -> list[float]:
    """Each limit's units left for ``who``, read by a peek that charges nothing."""
    return [s.remaining for s in store.peek(limits, who, cost=0, now_us=T0).limits]


# -- values of every wrong kind -----------------------------------------------------------------

#: Values of no use for any setting, option, cost or count (None excluded: it means "default").
JUNK = st.one_of(
    st.text(max_size=6),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(object),
    st.sampled_from([(), frozenset(), Decimal("1"), Fraction(1, 2), complex(1, 1), b"1"]),
)
NOT_A_NUMBER = st.one_of(JUNK, st.booleans())
NOT_A_MAPPING = st.one_of(
    st.text(max_size=6), st.lists(st.integers(), max_size=2), st.integers(), st.builds(object)
)
NOT_A_BOOL = st.one_of(JUNK, st.integers(), st.floats(allow_nan=False))
HUGE_INT = 10**400  # no float holds it: float(HUGE_INT) raises OverflowError
#: An int of more bits than fingerprints take in decimal, still short enough for hypothesis to
#: print (an int past str()'s 4,300 digits is tried by hand, below).
LONG_INT = 10**4000
#: An int str() refuses to convert (Python's default limit is 4,300 digits).
UNPRINTABLE_INT = 10**5000


def bad_seconds(*, zero_ok: bool = False) -> st.SearchStrategy[object]:
    """Durations no setting takes: not numbers, not positive, not finite, past MAX_SPAN."""
    low = st.floats(max_value=0.0, exclude_max=zero_ok) | st.integers(
        max_value=-1 if zero_ok else 0
    )
    return st.one_of(
        NOT_A_NUMBER,
        low,
        st.just(math.nan),
        st.floats(min_value=MAX_SPAN, exclude_min=True),
        st.integers(min_value=int(MAX_SPAN) + 1),
        st.just(HUGE_INT),
        st.sampled_from(["300", "5m", "1h"]),
    )


def bad_fraction(*, least: float = 0.0) -> st.SearchStrategy[object]:
    """Factors no setting takes: outside (0, 1], or outside [least, 1] when given."""
    below = st.floats(max_value=least, exclude_max=least > 0) if least else st.floats(max_value=0)
    return st.one_of(
        NOT_A_NUMBER,
        below,
        st.floats(min_value=1.0, exclude_min=True),
        st.integers(min_value=2),
        st.just(math.nan),
        st.just(HUGE_INT),
    )


def one_field(
    field: st.SearchStrategy[Any], value: st.SearchStrategy[Any], **fixed: object
) -> st.SearchStrategy[dict[Any, object]]:
    """A dict of the ``fixed`` items and one more: a drawn field with a drawn value."""
    return st.tuples(field, value).map(lambda pair: {**fixed, pair[0]: pair[1]})


def _overrides_badly(spec: object) -> bool:
    """A bad limit spec that stays bad merged over a good one (a missing rate is inherited)."""
    return isinstance(spec, dict) and "rate" in spec


BAD_RATES = st.one_of(
    NOT_A_NUMBER.filter(lambda v: not isinstance(v, str)),
    st.sampled_from(
        [
            "100/fortnight",
            "-5/m",
            "0/s",
            "nan/s",
            "inf/s",
            "1e400/s",
            "1/0s",
            "100",
            "/m",
            "ten/m",
            "",
            "1e13/s",  # more units than a bucket can count
            "0.0000000001/s",  # one unit in three centuries
            "1/100000000000d",  # a period of 274 million years
        ]
    ),
)
BAD_BURSTS = st.one_of(
    NOT_A_NUMBER,
    st.floats(max_value=0.0),
    st.integers(max_value=0),
    st.just(math.nan),
    st.just(math.inf),
    st.floats(min_value=MAX_UNITS, exclude_min=True),
    st.just(HUGE_INT),
    st.integers(min_value=4000, max_value=10**9),  # at 1/d: longer than MAX_SPAN to fill
)
BAD_PER = st.one_of(
    st.integers(),
    st.builds(object),
    st.lists(st.text(max_size=5).filter(lambda d: d not in BUILTIN_DIMENSIONS), min_size=1),
    st.sampled_from([["agent_id"], ["api_key", "api_key"], [["api_key"]], [1], [None]]),
)
BAD_LIMIT_SPECS = st.one_of(
    NOT_A_MAPPING,
    st.fixed_dictionaries({"burst": st.just(5)}),  # no rate
    st.fixed_dictionaries({"rate": BAD_RATES}),
    st.fixed_dictionaries({"rate": st.just("1/d"), "burst": BAD_BURSTS}),
    st.fixed_dictionaries({"rate": st.just("1/s"), "per": BAD_PER}),
    st.fixed_dictionaries(
        {
            "rate": st.just("1/s"),
            "burst": st.just(5),
            "max_cost": st.one_of(BAD_BURSTS, st.floats(min_value=5.01, max_value=1e6)),
        }
    ),
    st.fixed_dictionaries({"rate": st.just("1/s"), "algorithm": st.one_of(JUNK, st.just("leaky"))}),
    st.fixed_dictionaries(
        {"rate": st.just("1/s"), "algorithm": st.just("sliding_window"), "burst": st.just(1)}
    ),
    one_field(
        st.sampled_from(["unit", "anonymous"]),
        st.one_of(st.just(""), NOT_A_MAPPING).filter(lambda v: not (isinstance(v, str) and v)),
        rate="1/s",
    ),
    one_field(
        st.sampled_from(["mode", "on_store_error"]),
        JUNK.filter(lambda v: v not in ("enforce", "shadow", "open", "closed", "local")),
        rate="1/s",
    ),
    st.fixed_dictionaries({"rate": st.just("1/s"), "adaptive": NOT_A_BOOL}),
    st.fixed_dictionaries(
        {"rate": st.just("1/s"), "upstream": st.one_of(st.just(""), st.integers(), st.builds(list))}
    ),
    one_field(
        st.text(min_size=1, max_size=8).filter(lambda f: f not in _LIMIT_FIELDS),
        st.just(1),
        rate="1/s",
    ),
)
_LIMIT_FIELDS = _LIMIT_KEYS  # every field a limit takes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
BAD_NAMES = st.one_of(
    st.text(max_size=70).filter(lambda n: not _NAME.fullmatch(n)), st.integers(), st.none()
)
BAD_LADDERS = st.one_of(
    NOT_A_MAPPING.filter(lambda v: not isinstance(v, list)),
    st.lists(
        st.one_of(
            st.tuples(st.floats(min_value=100.5) | st.floats(max_value=-0.5), st.just(0.5)),
            st.tuples(st.just(50), bad_fraction()),
            st.sampled_from([[1], [1, 2, 3], "ab", None]),
        ),
        min_size=1,
        max_size=3,
    ),
)
BAD_ADAPTIVE = st.one_of(
    NOT_A_MAPPING,
    st.fixed_dictionaries({"enabled": NOT_A_BOOL}),
    one_field(st.sampled_from(["cpu", "memory", "busy", "signal_thresholds"]), BAD_LADDERS),
    one_field(st.sampled_from(["step", "upstream_decrease", "upstream_step"]), bad_fraction()),
    one_field(st.sampled_from(["floor", "upstream_floor"]), bad_fraction(least=MIN_FACTOR)),
    st.fixed_dictionaries({"relax": bad_seconds(zero_ok=True)}),
    one_field(st.sampled_from(["upstream_ttl", "upstream_quiet", "upstream_delay"]), bad_seconds()),
    st.fixed_dictionaries(
        {
            "signals": st.one_of(
                st.integers(),
                st.dictionaries(
                    st.just("q"),
                    st.one_of(st.integers(), st.sampled_from([":f", "os:sep", "no_such_mod:f"])),
                    min_size=1,
                ),
            )
        }
    ),
    one_field(
        st.text(min_size=1, max_size=8).filter(lambda f: f not in _ADAPTIVE_FIELDS), st.just(1)
    ),
)
_ADAPTIVE_FIELDS = _ADAPTIVE_KEYS  # every field throttle_adaptive takes
#: For each setting: values it must refuse, naming itself.
BAD_SETTINGS: dict[str, st.SearchStrategy[object]] = {
    "throttle_redis_url": st.one_of(
        NOT_A_NUMBER.filter(lambda v: not isinstance(v, str)),
        st.integers(),
        st.sampled_from(
            [
                "",
                "http://127.0.0.1/0",
                "REDIS://127.0.0.1/0",  # redis-py takes only lower-case schemes
                "redis://[::1",  # unbalanced IPv6 bracket
                "redis://127.0.0.1:notaport/0",
                "redis://127.0.0.1:99999/0",
                "redis://127.0.0.1/notadb",
                "redis://127.0.0.1/-1",
                "redis://127.0.0.1/0?socket_timeout=soon",
                "unix://",
                "redis:/127.0.0.1",
            ]
        ),
        st.text(max_size=12).filter(lambda u: not u.startswith(("redis", "unix"))),
    ),
    "throttle_redis_cluster": NOT_A_BOOL,
    "throttle_key_secret": st.one_of(
        st.text(max_size=15),
        st.binary(max_size=15),
        st.integers(),
        st.lists(st.text(min_size=16), min_size=1, max_size=1),
    ),
    "throttle_insecure_dev_secret": NOT_A_BOOL,
    "throttle_key_prefix": st.one_of(
        st.text(max_size=70).filter(lambda p: not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", p)),
        st.integers(),
        st.binary(min_size=1, max_size=4),
    ),
    "throttle_limits": st.one_of(
        NOT_A_MAPPING,
        st.dictionaries(st.just("llm"), BAD_LIMIT_SPECS, min_size=1),
        st.dictionaries(BAD_NAMES, st.just({"rate": "1/s"}), min_size=1),
    ),
    "throttle_tiers": st.one_of(
        NOT_A_MAPPING,
        st.dictionaries(BAD_NAMES, st.just({}), min_size=1),
        st.fixed_dictionaries({"gold": NOT_A_MAPPING}),
        st.fixed_dictionaries({"gold": st.fixed_dictionaries({"nope": st.just({"rate": "1/s"})})}),
        st.fixed_dictionaries(
            {
                "gold": st.fixed_dictionaries(
                    {"llm": st.one_of(NOT_A_MAPPING, BAD_LIMIT_SPECS.filter(_overrides_badly))}
                )
            }
        ),
    ),
    "throttle_tier_resolver": st.one_of(
        st.integers(),
        st.lists(st.integers(), max_size=1),
        st.sampled_from(
            [
                "",
                ":",
                ":fn",
                ".relative:fn",
                "a..b:fn",
                "os",
                "os:no_such_function",
                "os:sep",  # importable, not callable
                "no_such_module_for_throttle_tests:fn",
            ]
        ),
    ),
    "throttle_dimensions": st.one_of(
        st.text(max_size=6),
        st.integers(),
        st.lists(
            st.text(max_size=8).filter(lambda d: not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", d)),
            min_size=1,
        ),
        st.lists(st.one_of(st.integers(), st.builds(list)), min_size=1),
    ),
    "throttle_max_defer": bad_seconds(),
    "throttle_max_deferrals": st.one_of(JUNK, st.booleans(), st.integers(max_value=0), st.floats()),
    "throttle_booking_horizon": bad_seconds(),
    "throttle_booking_grace": bad_seconds(),
    "throttle_on_store_error": st.one_of(
        JUNK.filter(lambda v: v not in ("open", "closed", "local")), st.integers()
    ),
    "throttle_socket_timeout": bad_seconds(),
    "throttle_store_retry": bad_seconds(),
    "throttle_guard_ttl": bad_seconds(),
    "throttle_heartbeat_interval": bad_seconds(),
    "throttle_adaptive": BAD_ADAPTIVE,
    "throttle_load_interval": bad_seconds(),
    "throttle_counts_retention": st.one_of(
        NOT_A_NUMBER,
        st.floats(max_value=60.0, exclude_max=True).filter(lambda v: v != 0),
        st.integers(min_value=-(10**6), max_value=59).filter(lambda v: v != 0),
        st.floats(min_value=MAX_SPAN, exclude_min=True),
        st.just(math.nan),
        st.just(HUGE_INT),
    ),
}


# -- settings -----------------------------------------------------------------------------------


def test_every_setting_is_fuzzed() -> None:
    """The fuzzing below covers every key load_settings knows (a new key needs bad values)."""
    assert set(BAD_SETTINGS) == set(KNOWN)


#: The settings whose values have many parts get more examples.
NESTED = ("throttle_limits", "throttle_tiers", "throttle_adaptive")


@pytest.mark.parametrize("key", sorted(BAD_SETTINGS))
def test_a_bad_value_of_any_setting_is_refused_naming_the_key(key: str) -> None:
    """Wrong types, out-of-range numbers, malformed rates, URLs and import paths, for every
    key: a ConfigurationError naming the key it came in, when the settings are loaded."""

    @settings(max_examples=40 if key in NESTED else 15, deadline=None)
    @given(value=BAD_SETTINGS[key])
    def refused(value: object) -> None:
        with pytest.raises(ConfigurationError) as info:
            load_settings(conf_of(**{key: value}))
        assert info.value.field.startswith(key), (info.value.field, value)

    refused()


#: A value each setting takes, the extra settings it needs, and where the loaded settings show it.
GOOD: dict[str, tuple[object, dict[str, Any], Callable[[ThrottleSettings], object], object]] = {
    "throttle_redis_url": (
        "redis://127.0.0.1:6390/3",
        {},
        lambda s: s.redis_url,
        "redis://127.0.0.1:6390/3",
    ),
    "throttle_redis_cluster": (True, {}, lambda s: s.redis_cluster, True),
    "throttle_key_secret": ("k" * 20, {}, lambda s: s.key_secret, b"k" * 20),
    "throttle_insecure_dev_secret": (
        True,
        {"throttle_key_secret": None},
        lambda s: b"insecure" in s.key_secret,
        True,
    ),
    "throttle_key_prefix": ("p.1:x", {}, lambda s: s.key_prefix, "p.1:x"),
    "throttle_limits": ({"x": {"rate": "5/s"}}, {}, lambda s: s.limit_names, {"x"}),
    "throttle_tiers": (
        {"gold": {"llm": {"rate": "7/s"}}},
        {},
        lambda s: s.policy("llm", "gold").limit.rate.count,
        7,
    ),
    "throttle_tier_resolver": (
        "os:getpid",
        {},
        lambda s: s.tier_resolver.__name__,  # type: ignore[union-attr]
        "getpid",
    ),
    "throttle_dimensions": (["model"], {}, lambda s: s.dimensions, ("model",)),
    "throttle_max_defer": (12.5, {}, lambda s: s.max_defer, 12.5),
    "throttle_max_deferrals": (3, {}, lambda s: s.max_deferrals, 3),
    "throttle_booking_horizon": (99, {}, lambda s: s.horizon, 99),
    "throttle_booking_grace": (77, {}, lambda s: s.booking_grace, 77),
    "throttle_on_store_error": (
        "closed",
        {},
        lambda s: s.policy("llm").on_store_error,
        "closed",
    ),
    "throttle_socket_timeout": (0.125, {}, lambda s: s.socket_timeout, 0.125),
    "throttle_store_retry": (2.5, {}, lambda s: s.store_retry, 2.5),
    "throttle_guard_ttl": (7200, {}, lambda s: s.guard_ttl, 7200),
    "throttle_heartbeat_interval": (3, {}, lambda s: s.heartbeat_interval, 3),
    "throttle_adaptive": ({"enabled": False}, {}, lambda s: s.adaptive.enabled, False),
    "throttle_load_interval": (0.5, {}, lambda s: s.adaptive.interval, 0.5),
    "throttle_counts_retention": (0, {}, lambda s: s.counts_retention, 0),
}


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_a_good_value_of_any_setting_is_used(key: str) -> None:
    """Never silently ignored: a valid value of each key shows in the loaded settings."""
    value, extra, shown, expected = GOOD[key]
    assert shown(load_settings(conf_of(**extra, **{key: value}))) == expected


@FEW
@given(name=st.from_regex(r"throttle_[a-z0-9_]{1,16}", fullmatch=True))
def test_an_unknown_setting_is_refused_by_name(name: str) -> None:
    """A throttle_* key that does not exist is an error naming it, not a value ignored."""
    if name in KNOWN:
        return
    with pytest.raises(ConfigurationError) as info:
        load_settings(conf_of(**{name: 1}))
    assert info.value.field == name


@FEW
@given(
    key=st.sampled_from(sorted(KNOWN)),
    upper=st.lists(st.booleans(), min_size=40, max_size=40),
    celery=st.booleans(),
)
def test_a_setting_spelt_so_celery_never_reads_it_is_refused(
    key: str, upper: list[bool], celery: bool
) -> None:
    """THROTTLE_LIMITS, Throttle_Max_Defer, CELERY_THROTTLE_X without the CELERY namespace:
    Celery never hands these to throttle, so their values would be ignored; each is an error
    naming the key as it was written."""
    spelt = "".join(c.upper() if up else c for c, up in zip(key, upper, strict=False))
    spelt += key[len(spelt) :]
    if celery:
        spelt = "CELERY_" + spelt
    if spelt == key:
        return
    value, extra, _, _ = GOOD[key]
    with pytest.raises(ConfigurationError) as info:
        load_settings(conf_of(**extra, **{spelt: value}))
    assert info.value.field == spelt


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"rate": "1/d", "burst": 1e15}, "burst"),  # fills in 2.7 trillion years
        ({"rate": "1/s", "burst": 1e13}, "burst"),  # more units than a reply holds
        ({"rate": "1/s", "burst": HUGE_INT}, "burst"),
        ({"rate": "1/s", "max_cost": HUGE_INT}, "max_cost"),
        ({"rate": "1e300/s"}, "rate"),
        ({"rate": "0.000000000000001/s"}, "rate"),
        ({"rate": "1/1000000000000000000000000d"}, "rate"),
        ({"rate": "1/1000000000000000000000000d", "algorithm": "sliding_window"}, "rate"),
    ],
)
def test_a_limit_no_store_can_keep_is_refused_when_loaded(spec: dict[str, Any], field: str) -> None:
    """Limits that used to load and then failed every admission with a Redis error (a key
    expiry or a reply out of range), or raised OverflowError while loading: refused, naming
    the field."""
    with pytest.raises(ConfigurationError) as info:
        load_settings(conf_of(throttle_limits={"llm": spec}))
    assert info.value.field == f"throttle_limits['llm'].{field}"


@pytest.mark.parametrize(
    ("adaptive", "field"),
    [
        ({"floor": 1e-300}, "floor"),
        ({"upstream_floor": 1e-6}, "upstream_floor"),
        ({"relax": HUGE_INT}, "relax"),
        ({"upstream_ttl": 1e308}, "upstream_ttl"),
    ],
)
def test_an_adaptive_number_no_store_can_keep_is_refused(
    adaptive: dict[str, Any], field: str
) -> None:
    """A floor so low that a limit slowed to it overflows the scripts' arithmetic, or a span
    past MAX_SPAN: refused, naming the field."""
    with pytest.raises(ConfigurationError) as info:
        load_settings(conf_of(throttle_adaptive=adaptive))
    assert info.value.field == f"throttle_adaptive.{field}"


def test_a_limit_that_loads_admits_cleanly_at_its_extremes(store: BaseStore) -> None:
    """The widest limits the settings take (a period of MAX_SPAN, MAX_UNITS units, a bucket
    that takes MAX_SPAN to fill, at the lowest factors) admit, book and settle without a
    Redis error, on every store."""
    s = fresh(store)
    years = f"1/{MAX_SPAN:.0f}s"
    limits = [
        Limit("wide", f"{MAX_UNITS:.0f}/s"),
        Limit("slow", years, burst=1),
        Limit("window", years, algorithm="sliding_window"),
        Limit("full", "1/d", burst=MAX_SPAN / 86400),
    ]
    s.override_load_factor(MIN_FACTOR, now_us=T0)
    factor = s.upstream_throttled(limits, KEY, decrease=MIN_FACTOR, floor=MIN_FACTOR, now_us=T0)
    assert factor == MIN_FACTOR
    for limit in limits:
        cost = min(limit.burst, 1e6)
        first = s.admit([limit], KEY, cost=cost, adaptive=True, now_us=T0)
        assert first.allowed, limit
        assert first.receipt is not None
        booked = s.admit([limit], KEY, cost=cost, reserve=True, adaptive=True, now_us=T0)
        assert booked.outcome in (Outcome.BOOKED, Outcome.HORIZON, Outcome.ADMITTED), limit
        s.settle(first.receipt, {limit.name: cost * 2}, now_us=T0)
        assert all(math.isfinite(x) for x in remaining(s, [limit], KEY))


# -- task options ---------------------------------------------------------------------------------

BAD_CONSTANT_COSTS = st.one_of(
    st.floats(max_value=-1e-300),
    st.integers(max_value=-1),
    st.just(math.nan),
    st.just(math.inf),
    st.just(HUGE_INT),
    st.just(-HUGE_INT),
    NOT_A_NUMBER.filter(lambda v: not isinstance(v, dict)),
)


@FEW
@given(cost=BAD_CONSTANT_COSTS, mapped=st.booleans())
def test_a_bad_constant_cost_fails_at_decoration(cost: object, mapped: bool) -> None:
    """A task option cost that is not a finite number >= 0 (or a callable) is refused when the
    function is decorated, naming the option and the limit."""
    with pytest.raises(ConfigurationError) as info:
        throttle.limit("llm", cost={"llm": cost} if mapped else cost)
    assert "throttle_cost['llm']" in info.value.field


@pytest.mark.parametrize("rate", ["1e13/s", "0.000000000000001/s", "1/99999999999d"])
def test_an_inline_rate_no_bucket_can_keep_fails_at_decoration(rate: str) -> None:
    """throttle="1e13/s" and the like parse, but no store could keep them: refused when the
    function is decorated, naming the option."""
    with pytest.raises(ConfigurationError) as info:
        throttle.limit(rate)
    assert info.value.field == "throttle.limit() throttle"


def registered(name: str, **options: Any) -> None:
    """Register a task with ``options`` on an app of its own, as a worker does at start."""
    app = Celery("options", set_as_current=False)
    app.conf.update(BASE)
    ext = throttle.Throttle(app)

    @app.task(name=name, shared=False, **options)
    def task() -> None: ...

    ext.gate.spec_for(app.tasks[name])


@pytest.mark.parametrize(
    "options",
    [
        {"throttle": ["llm"], "throttle_cost": {"llm": 21}},  # llm's burst is 20
        {"throttle": "5/s", "throttle_cost": 6},  # an inline rate's burst is its count
    ],
)
def test_a_constant_cost_no_bucket_holds_fails_at_registration(options: dict[str, Any]) -> None:
    """A constant cost above the limit's burst could never be admitted: refused when the task
    is registered, naming the task and the option."""
    with pytest.raises(ConfigurationError) as info:
        registered("t.costly", **options)
    assert "task 't.costly' throttle_cost" in info.value.field


def test_an_unknown_task_option_is_refused_by_name() -> None:
    """@app.task(throttle=..., throttle_csot=...): the misspelt option would be ignored; it is
    an error naming the task and the option when the task is registered (as a worker starts)."""
    with pytest.raises(ConfigurationError, match="throttle_csot") as info:
        registered("t.typo", throttle=["llm"], throttle_csot={"llm": 5})
    assert "t.typo" in info.value.field


# -- identities -----------------------------------------------------------------------------------

MB = "m" * (1 << 20)
ODD_TEXT = [
    "",
    " ",
    "{",
    "}",
    "{}",
    "{x}",
    "*",
    "?",
    "[a]",
    ":",
    "::",
    "a:b",
    "*:*",
    "\n",
    "\r\n",
    "a\nb",
    "\x00",
    "~b",
    "anonymous",
    "ü",
    "🦄",
    "\ud800",  # a lone surrogate: not even valid UTF-8
    "\u202e",
]
IDENTITY_VALUES = st.one_of(
    st.none(),
    st.sampled_from(ODD_TEXT),
    st.text(max_size=12),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, LONG_INT, -LONG_INT]),
    st.binary(max_size=8),
    st.sampled_from([MB, MB + "{", MB.encode()]),
)


def _as_identity(value: object) -> tuple[str, object]:
    """What makes two identity values the same identity: type and value."""
    return type(value).__name__, value


FINGERPRINT = r"[A-Za-z0-9_-]{16}"


@FEW_WITH_FIXTURES
@given(values=st.lists(IDENTITY_VALUES, min_size=1, max_size=6, unique_by=_as_identity))
def test_odd_api_keys_each_get_a_bucket_of_their_own(
    store: BaseStore, values: list[object]
) -> None:
    """Empty, None, integers (huge ones too), 1 MB strings, unicode, newlines, braces, '*' and
    ':': each API key is admitted against a bucket of its own (none shares one), with no Redis
    error, under keys of the configured prefix made of fingerprints only."""
    s = fresh(store)
    limit = Limit("req", "1/h", burst=1)
    who: list[dict[str, object]] = [{} if v is None else {"api_key": v} for v in values]
    assert [s.admit([limit], w, now_us=T0).outcome for w in who] == [Outcome.ADMITTED] * len(who)
    assert [s.admit([limit], w, now_us=T0).outcome for w in who] == [Outcome.DENIED] * len(who)
    layout = re.compile(rf"{s.keyspace.prefix}:\{{{FINGERPRINT}\}}:req")
    keys = keys_of(s)
    assert len(keys) == len(values)
    assert all(layout.fullmatch(k) for k in keys), keys


@FEW_WITH_FIXTURES
@given(values=st.lists(IDENTITY_VALUES, min_size=1, max_size=6, unique_by=_as_identity))
def test_odd_agent_ids_each_get_a_share_of_their_own(
    store: BaseStore, values: list[object]
) -> None:
    """The same for agent IDs within one API key: one bucket each, in the API key's hash tag,
    and the key's own bucket is charged once per admission."""
    s = fresh(store)
    key = Limit("key", "1/h", burst=100)
    share = Limit("share", "1/h", burst=1, per=["api_key", "agent_id"])
    who = [{"api_key": "k", **({} if v is None else {"agent_id": v})} for v in values]
    outcomes = [s.admit([key, share], w, now_us=T0).outcome for w in who]
    assert outcomes == [Outcome.ADMITTED] * len(who)
    again = [s.admit([key, share], w, now_us=T0) for w in who]
    assert [d.bound_by for d in again] == ["share"] * len(who)
    assert remaining(s, [key], {"api_key": "k"}) == [100 - len(who)]
    tag = rf"\{{{FINGERPRINT}\}}"
    layout = re.compile(rf"{s.keyspace.prefix}:{tag}:(key|share:{FINGERPRINT})")
    keys = keys_of(s)
    assert len(keys) == len(values) + 1
    assert all(layout.fullmatch(k) for k in keys), keys
    assert len({k.split(":")[1] for k in keys}) == 1  # one hash tag: the API key's


def test_an_integer_identity_past_what_str_converts_is_a_tenant_of_its_own(
    store: BaseStore,
) -> None:
    """Integers of more digits than str() converts (Python's limit is 4,300) are identities
    like any other: one bucket each, never an exception."""
    s = fresh(store)
    limit = Limit("req", "1/h", burst=1)
    values = [UNPRINTABLE_INT, -UNPRINTABLE_INT, UNPRINTABLE_INT + 1, LONG_INT]
    for value in values:
        assert s.admit([limit], {"api_key": value}, now_us=T0).allowed
        assert not s.admit([limit], {"api_key": value}, now_us=T0).allowed
    assert len(keys_of(s)) == len(values)


# -- costs and usage reports ----------------------------------------------------------------------

#: Costs no limit of burst 10 can take.
BAD_COSTS = st.one_of(
    st.floats(max_value=-1e-300),
    st.integers(max_value=-1),
    st.just(-HUGE_INT),
    st.just(math.nan),
    st.floats(min_value=10.0, exclude_min=True),
    st.integers(min_value=11),
    st.just(HUGE_INT),
    NOT_A_NUMBER.filter(lambda v: not isinstance(v, dict)),  # a dict is a per-limit mapping
    st.none(),
)


@FEW_WITH_FIXTURES
@given(cost=BAD_COSTS, per_limit=st.booleans())
def test_a_bad_cost_is_refused_and_the_buckets_are_unharmed(
    store: BaseStore, cost: object, per_limit: bool
) -> None:
    """Negative, NaN, infinite, huge (past the burst, past any float) and non-numeric costs,
    as one number or per limit: a CostError naming the limit, and nothing charged."""
    s = fresh(store)
    req = Limit("req", "1/h", burst=10)
    tokens = Limit("tokens", "1/h", burst=10, unit="tokens")
    assert s.admit([req, tokens], KEY, cost={"tokens": 3}, now_us=T0).allowed
    asked = {"tokens": cost} if per_limit else cost
    with pytest.raises(CostError) as info:
        s.admit([req, tokens], KEY, cost=asked, reserve=True, now_us=T0)  # type: ignore[arg-type]
    named = "tokens" if per_limit else "req"
    assert info.value.limit == named
    assert repr(named) in str(info.value)
    assert remaining(s, [req, tokens], KEY) == [9, 7]


@pytest.mark.parametrize("zero", [0, 0.0, -0.0])
def test_a_zero_cost_is_a_check_that_charges_nothing(store: BaseStore, zero: float) -> None:
    """Zero, in any spelling, is a valid cost: the admission is answered and nothing is
    charged."""
    s = fresh(store)
    tokens = Limit("tokens", "1/h", burst=10)
    for _ in range(3):
        decision = s.admit([tokens], KEY, cost=zero, now_us=T0)
        assert decision.allowed
        assert decision.limits[0].remaining == 10


#: Usage reports no limit of burst 1,000 at 1,000/s can take.
BAD_USAGE = st.one_of(
    st.floats(max_value=-1e-300),
    st.integers(max_value=-1),
    st.just(math.nan),
    st.just(math.inf),
    st.floats(min_value=MAX_UNITS, exclude_min=True),
    st.integers(min_value=int(MAX_UNITS) + 1),
    st.just(HUGE_INT),
    NOT_A_NUMBER,
    st.none(),
)


@FEW_WITH_FIXTURES
@given(usage=BAD_USAGE)
def test_a_bad_usage_report_is_refused_and_the_bucket_is_unharmed(
    store: BaseStore, usage: object
) -> None:
    """Settling with a usage that is negative, NaN, infinite, larger than any bucket counts or
    not a number: a CostError naming the limit, the estimate still charged, and the receipt
    still good for a correct report."""
    s = fresh(store)
    tokens = Limit("tokens", "1000/s", burst=1000, unit="tokens")
    decision = s.admit([tokens], KEY, cost=300, now_us=T0)
    assert decision.receipt is not None
    with pytest.raises(CostError) as info:
        s.settle(decision.receipt, {"tokens": usage}, now_us=T0)  # type: ignore[dict-item]
    assert info.value.limit == "tokens"
    assert remaining(s, [tokens], KEY) == [700]
    s.settle(decision.receipt, {"tokens": 100}, now_us=T0)
    assert remaining(s, [tokens], KEY) == [900]


def test_a_usage_report_past_ten_years_of_refill_is_refused(store: BaseStore) -> None:
    """A report that would put a slow bucket in debt for longer than MAX_SPAN is refused (the
    bucket could never recover, and its key's expiry would overflow); a large report within it
    is charged into debt. A usage that is not a mapping is an error naming it."""
    s = fresh(store)
    hourly = Limit("hourly", "1/h", burst=10)
    decision = s.admit([hourly], KEY, cost=1, now_us=T0)
    assert decision.receipt is not None
    years = 10 + MAX_SPAN / 3600
    with pytest.raises(CostError, match="hourly"):
        s.settle(decision.receipt, {"hourly": years + 2}, now_us=T0)
    assert remaining(s, [hourly], KEY) == [9]
    with pytest.raises(ConfigurationError, match="usage"):
        s.settle(decision.receipt, 5, now_us=T0)  # type: ignore[arg-type]
    s.settle(decision.receipt, {"hourly": 1000}, now_us=T0)
    assert remaining(s, [hourly], KEY) == pytest.approx([-990])


@FEW_WITH_FIXTURES
@given(
    horizon=st.one_of(
        st.floats(max_value=-1e-300),
        st.just(math.nan),
        st.floats(min_value=MAX_SPAN, exclude_min=True),
        st.just(HUGE_INT),
        NOT_A_NUMBER,
    )
)
def test_a_bad_horizon_is_refused_before_anything_is_charged(
    store: BaseStore, horizon: object
) -> None:
    """A booking horizon that is not seconds in [0, MAX_SPAN] is a ConfigurationError naming
    it; nothing is charged."""
    s = fresh(store)
    limit = Limit("req", "1/h", burst=10)
    with pytest.raises(ConfigurationError, match="horizon"):
        s.admit([limit], KEY, reserve=True, horizon=horizon, now_us=T0)  # type: ignore[arg-type]
    assert remaining(s, [limit], KEY) == [10]


@pytest.mark.parametrize("horizon", [-5, math.nan, math.inf, "x"])
def test_a_bad_horizon_is_refused_for_an_identity_whose_plan_is_not_remembered(
    redis_client: redis.Redis, keyspace: Keyspace, horizon: object
) -> None:
    """An identity that is a Mapping but not a dict is not remembered: its admission is packed
    from its shape's parts (the store's fast path for identities that seldom recur), and a bad
    horizon is refused there too, before anything is charged."""
    store = RedisStore(redis_client, keyspace)
    limit = Limit("req", "1/h", burst=10)
    who = types.MappingProxyType(dict(KEY))
    with pytest.raises(ConfigurationError, match="horizon"):
        store.admit([limit], who, reserve=True, horizon=horizon)  # type: ignore[arg-type]
    assert store.peek([limit], KEY).limits[0].remaining == 10


@pytest.mark.parametrize("remembered", [True, False], ids=["remembered", "not-remembered"])
@pytest.mark.parametrize("horizon", [[60], {}, True, "60", -5, math.nan])
def test_a_bad_horizon_is_refused_by_a_plain_admission(
    redis_client: redis.Redis, keyspace: Keyspace, horizon: object, remembered: bool
) -> None:
    """A plain admission (packed ahead: no booking, guard or test clock) refuses a bad horizon
    with a ConfigurationError naming it, whether its plan is remembered or not, also once a
    good horizon's admission is packed (True is not 1 second); nothing is charged."""
    store = RedisStore(redis_client, keyspace)
    if not remembered:
        store._plan_pause = 1 << 30
    limit = Limit("req", "1/h", burst=10)
    store.admit([limit], KEY, reserve=True, horizon=1)
    with pytest.raises(ConfigurationError, match="horizon"):
        store.admit([limit], KEY, reserve=True, horizon=horizon)  # type: ignore[arg-type]
    # 9 left, and what refilled since (on the server's clock): the refused call took nothing.
    assert math.floor(store.peek([limit], KEY).limits[0].remaining) == 9


# -- through a worker -----------------------------------------------------------------------------


@pytest.fixture
def db(redis_client: redis.Redis) -> redis.Redis:
    """The store database (db 0), emptied with all others before the test."""
    return redis_client


@pytest.fixture
def settled() -> Iterator[Callable[[str], None]]:
    """Wait until a task's postrun (and so its settlement, which runs before) is over."""
    done: dict[str, threading.Event] = {}
    lock = threading.Lock()

    def event(task_id: str) -> threading.Event:
        with lock:
            return done.setdefault(task_id, threading.Event())

    def after(task_id: str = "", **_: Any) -> None:
        event(task_id).set()

    task_postrun.connect(after, weak=False)

    def wait(task_id: str) -> None:
        assert event(task_id).wait(TIMEOUT), f"task {task_id} never finished"

    yield wait
    task_postrun.disconnect(after)


@pytest.fixture
def throttled() -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Every task_throttled signal of the test, by task id."""
    seen: dict[str, list[dict[str, Any]]] = {}

    def note(task_id: str = "", **kw: Any) -> None:
        seen.setdefault(task_id, []).append(kw)

    signals.task_throttled.connect(note, weak=False)
    yield seen
    signals.task_throttled.disconnect(note)


def wait_for(found: Callable[[], bool]) -> None:
    """Poll a condition the worker makes true (never a fixed sleep): fail after TIMEOUT."""
    event = threading.Event()
    for _ in range(int(TIMEOUT / 0.01)):
        if found():
            return
        event.wait(0.01)
    raise AssertionError("the condition never came true")


def test_odd_identities_through_a_worker_are_charged_to_their_own_buckets(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Through a real worker (JSON messages): each odd API key, None included, is admitted
    against its own bucket and its keys are fingerprints under the prefix; values no
    fingerprint takes (a float, a list, a dict) fail the task with an IdentityError, and an
    identity callable that raises fails it naming the option: none runs unthrottled."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "1/h", "burst": 1}})
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle=["req"])
    def step(**kwargs: Any) -> str:
        db.rpush("runs", "x")
        return "ran"

    @app.task(
        name=f"{app.main}.picky",
        throttle=["req"],
        throttle_identity={"api_key": lambda args, kwargs: args[0]},
    )
    def picky(*args: Any) -> str:
        db.rpush("runs", "picky")
        return "ran"

    worker(app)
    values: list[object] = ["", "{", "}", "*", ":", "{}:*", "a\nb", "ü🦄", 0, -7, 2**70, MB, None]
    results = [step.delay(**({} if v is None else {"api_key": v})) for v in values]
    assert [r.get(timeout=TIMEOUT) for r in results] == ["ran"] * len(values)
    limit = ext.settings.policy("req").limit
    store = ext.store()
    for v in values:
        who = {} if v is None else {"api_key": v}
        assert store.peek([limit], who).limits[0].remaining == pytest.approx(0, abs=0.01), v
    layout = re.compile(rf"throttle:\{{{FINGERPRINT}\}}:req")
    buckets = [k.decode() for k in db.keys("throttle:*") if not k.startswith(b"throttle:{~")]
    assert len(buckets) == len(values)
    assert all(layout.fullmatch(k) for k in buckets), buckets
    for bad in (1.5, [1], {"k": 1}):
        with pytest.raises(IdentityError, match="api_key"):
            step.delay(api_key=bad).get(timeout=TIMEOUT)
    with pytest.raises(ConfigurationError, match="throttle_identity"):
        picky.delay().get(timeout=TIMEOUT)
    assert db.llen("runs") == len(values)


def test_a_cost_callable_returning_garbage_fails_the_task_clearly(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A cost callable that returns NaN, a negative, infinite, huge or non-numeric cost fails
    its task with a CostError naming the limit; the task never runs and its bucket is
    unharmed."""
    garbage: list[object] = [math.nan, -1, math.inf, 1e300, HUGE_INT, "12", None]
    app = make_app(
        redis_server, throttle_limits={"tokens": {"rate": "1/h", "burst": 100, "max_cost": 50}}
    )
    ext = throttle.Throttle(app)

    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        return garbage[kwargs["which"]]

    @app.task(name=f"{app.main}.call", throttle=["tokens"], throttle_cost={"tokens": estimate})
    def call(*, api_key: str, which: int) -> str:
        db.rpush("runs", "x")
        return "ran"

    worker(app)
    results = [call.delay(api_key="k", which=i) for i in range(len(garbage))]
    for result in results:
        with pytest.raises(CostError, match="tokens"):
            result.get(timeout=TIMEOUT)
    assert db.llen("runs") == 0
    limit = ext.settings.policy("tokens").limit
    assert ext.store().peek([limit], {"api_key": "k"}).limits[0].remaining == 100


def test_report_usage_refuses_garbage_inside_the_task(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    settled: Callable[[str], None],
) -> None:
    """report_usage() with a negative, NaN, infinite, huge, non-numeric value, or for a limit
    the task is not throttled by, raises CostError in the task naming the limit; the estimate
    the task was admitted with stays charged."""
    garbage: list[dict[str, object]] = [
        {"tokens": -1},
        {"tokens": math.nan},
        {"tokens": math.inf},
        {"tokens": HUGE_INT},
        {"tokens": MAX_UNITS * 2},
        {"tokens": "12"},
        {"tokens": None},
        {"tokenz": 5},
    ]
    app = make_app(redis_server, throttle_limits={"tokens": {"rate": "1/h", "burst": 1000}})
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.call", throttle=["tokens"], throttle_cost={"tokens": 10})
    def call(*, api_key: str, which: int) -> str:
        try:
            throttle.report_usage(garbage[which])  # type: ignore[arg-type]
        except CostError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "accepted"

    worker(app)
    for i, report in enumerate(garbage):
        result = call.delay(api_key="k", which=i)
        said = result.get(timeout=TIMEOUT)
        settled(result.id)
        assert said.startswith("CostError"), (report, said)
        assert repr(next(iter(report))) in said
    limit = ext.settings.policy("tokens").limit
    left = ext.store().peek([limit], {"api_key": "k"}).limits[0].remaining
    assert left == pytest.approx(1000 - 10 * len(garbage), abs=0.1)


#: Junk that survives a JSON message (header values must).
WIRE_JUNK = st.one_of(
    st.text(max_size=6),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _garbage_headers(victim: dict[str, Any]) -> st.SearchStrategy[dict[str, object]]:
    """Throttle headers a publisher may get wrong or forge: tokens, bookings and deferral
    counts of every kind, identity headers that are not a mapping, that are sealed with a
    forged signature (the victim's fingerprint among them) or that hold values no fingerprint
    takes, admission receipts naming the victim's bucket, and pre-seeded usage reports."""
    hexes = st.text("0123456789abcdef", min_size=16, max_size=16)
    booking_ids = st.from_regex(r"[A-Za-z0-9_-]{16}", fullmatch=True)
    forged_sealed = st.fixed_dictionaries(
        {
            "sealed": st.sampled_from([1, True, "yes"]),
            "fp": st.one_of(
                st.just({"api_key": victim["fp"]}),
                st.dictionaries(st.sampled_from(["api_key", "agent_id"]), WIRE_JUNK, max_size=2),
                WIRE_JUNK,
            ),
            "sig": st.one_of(hexes, WIRE_JUNK, st.just(victim["sig"])),
        }
    )
    unfingerprintable = st.dictionaries(
        st.just("api_key"),
        st.one_of(st.floats(), st.lists(st.integers(), max_size=2), st.booleans()),
        min_size=1,
    )
    forged_receipt = st.fixed_dictionaries(
        {
            "tier": st.just("default"),
            "nonce": st.text("abcdef0123", min_size=4, max_size=12),
            "charges": st.just([["req", victim["tag"], victim["key"], 5]]),
        }
    )
    return st.fixed_dictionaries(
        {},
        optional={
            H.TOKEN: st.one_of(hexes, WIRE_JUNK, st.integers()),
            H.BOOKING: st.one_of(
                booking_ids, st.just(victim["booking"]), WIRE_JUNK, st.sampled_from(["{bad}", "*"])
            ),
            H.DEFERRALS: st.one_of(st.integers(), WIRE_JUNK, st.floats()),
            H.IDENTITY: st.one_of(
                WIRE_JUNK.filter(lambda v: not isinstance(v, dict)),
                forged_sealed,
                unfingerprintable,
            ),
            H.ADMITTED: st.one_of(forged_receipt, WIRE_JUNK, st.just({"local": 1})),
            "throttle_usage": st.one_of(st.just({"req": 0}), WIRE_JUNK),
        },
    )


class _Forgery:
    """An app with one limit ``req`` and a task throttled by it, and a victim tenant that has
    used ``used`` units and holds a booking: what a forger would name in its headers."""

    def __init__(self, server: RedisServer, rate: str, *, burst: float, used: float) -> None:
        self.app = make_app(server, throttle_limits={"req": {"rate": rate, "burst": burst}})
        self.ext = throttle.Throttle(self.app)
        self.limit = self.ext.settings.policy("req").limit
        self.store = self.ext.store()

        @self.app.task(name=f"{self.app.main}.step", throttle=["req"])
        def step(*, api_key: str) -> str:
            return "ran"

        self.step = step
        self.victim: dict[str, object] = {"api_key": "victim-key"}
        assert self.store.admit([self.limit], self.victim, cost=used).allowed
        self.booked = self.store.admit([self.limit], self.victim, reserve=True)
        assert self.booked.outcome is Outcome.BOOKED
        assert self.booked.booking is not None
        bucket = self.store.charges([self.limit], self.victim)[0].bucket
        sealed = H.seal_identity(self.victim, "another-task-id", self.ext.keyspace)
        self.facts = {
            "fp": self.ext.keyspace.fingerprint("api_key", "victim-key"),
            "sig": sealed["sig"],
            "tag": bucket.tag,
            "key": bucket.key,
            "booking": self.booked.booking,
        }


def test_garbage_and_forged_headers_are_checked_as_fresh_arrivals(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    settled: Callable[[str], None],
) -> None:
    """Whatever throttle headers a message carries (missing, malformed, or forged: another
    tenant's fingerprint, signature or booking, a fake deferral token, a forged admission
    receipt or usage report), the task runs once, charged exactly one unit to its own API key,
    and the other tenant's bucket and booking are untouched."""
    forge = _Forgery(redis_server, "1/h", burst=3, used=3)
    app, limit, store, step = forge.app, forge.limit, forge.store, forge.step
    victim, booked, facts = forge.victim, forge.booked, forge.facts
    seen = store.peek([limit], victim)
    assert seen.at is not None
    before = seen.limits[0]
    # When the victim's bucket admits next, on the store's clock: what nobody else may move.
    free_before = seen.at + before.retry_after
    worker(app)
    attackers = itertools.count()
    # A publisher without throttle: its identity headers reach the worker as they were
    # written, not sealed on the way out.
    publisher = Celery("publisher", broker=app.conf.broker_url, set_as_current=False)

    @settings(max_examples=25, deadline=None)
    @given(headers=_garbage_headers(facts))
    @example(headers={"throttle_usage": {"req": 0}})  # once settled as if the task reported it
    @example(headers={H.IDENTITY: {"api_key": 1.5}})  # once a failure in the pool
    def checked(headers: dict[str, object]) -> None:
        who = {"api_key": f"mallory-{next(attackers)}"}
        sent = publisher.send_task(step.name, kwargs=who, headers=headers)
        assert app.AsyncResult(sent.id).get(timeout=TIMEOUT) == "ran"
        settled(sent.id)
        assert store.peek([limit], who).limits[0].remaining == pytest.approx(2, abs=0.01)

    checked()
    seen = store.peek([limit], victim)
    assert seen.at is not None
    after = seen.limits[0]
    assert after.remaining == pytest.approx(before.remaining, abs=0.01)
    assert seen.at + after.retry_after == pytest.approx(free_before, abs=1e-5)
    # The victim's own booking is still there for the victim, at its slot.
    now = db.time()
    slot = int(now[0]) * 1_000_000 + int(now[1]) + math.ceil(booked.retry_after * 1e6)
    back = store.admit([limit], victim, booking=booked.booking, now_us=slot)
    assert back.outcome is Outcome.REDEEMED


def test_deferred_work_with_garbage_headers_is_never_lost(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    throttled: dict[str, list[dict[str, Any]]],
) -> None:
    """Work denied while it carries garbage or forged throttle headers is deferred like any
    other (its next copy gets headers of its own) and runs: two tasks with the same headers
    against a bucket of one both complete, the second deferred to its slot first."""
    forge = _Forgery(redis_server, "5/s", burst=1, used=1)
    app, step, facts = forge.app, forge.step, forge.facts
    worker(app)
    attackers = itertools.count()
    publisher = Celery("publisher", broker=app.conf.broker_url, set_as_current=False)

    @settings(max_examples=10, deadline=None)
    @given(headers=_garbage_headers(facts))
    @example(headers={H.IDENTITY: {"api_key": 0.0}})  # once re-published, never again
    def deferred_and_run(headers: dict[str, object]) -> None:
        who = {"api_key": f"mallory-{next(attackers)}"}
        sent = [publisher.send_task(step.name, kwargs=who, headers=headers) for _ in range(2)]
        assert [app.AsyncResult(r.id).get(timeout=TIMEOUT) for r in sent] == ["ran", "ran"]
        assert sent[1].id in throttled  # the second waited for the 0.2 s slot

    deferred_and_run()


def test_a_raw_identity_header_holding_a_fingerprint_is_not_that_tenant(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A raw (unsealed) identity header whose API key is another tenant's fingerprint is taken
    as the text it is: the work is charged to a tenant of that name, never to the tenant the
    fingerprint stands for."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "1/h", "burst": 1}})
    ext = throttle.Throttle(app)
    limit = ext.settings.policy("req").limit

    @app.task(name=f"{app.main}.step", throttle=["req"])
    def step(**kwargs: Any) -> str:
        return "ran"

    worker(app)
    fp = ext.keyspace.fingerprint("api_key", "victim-key")
    header = {H.IDENTITY: {"api_key": fp}}
    assert step.apply_async(headers=header).get(timeout=TIMEOUT) == "ran"
    assert ext.store().peek([limit], {"api_key": "victim-key"}).limits[0].remaining == 1
    assert ext.store().peek([limit], {"api_key": fp}).limits[0].remaining == pytest.approx(
        0, abs=0.01
    )


def test_a_forged_admission_buys_nothing_where_no_gate_runs(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    throttled: dict[str, list[dict[str, Any]]],
) -> None:
    """On a worker without the gate step the pool side admits work itself: a message carrying
    a forged admission receipt (naming another tenant's bucket) and a forged usage report is
    checked like any other, deferred when its own bucket is empty, and the other tenant is
    never charged or refunded."""
    from throttle.celeryext.worker import GateStep

    app = make_app(redis_server, throttle_limits={"req": {"rate": "1/h", "burst": 1}})
    ext = throttle.Throttle(app)
    app.steps["consumer"].discard(GateStep)
    limit = ext.settings.policy("req").limit
    store = ext.store()

    @app.task(name=f"{app.main}.step", throttle=["req"])
    def step(*, api_key: str) -> str:
        db.rpush("runs", api_key)
        return "ran"

    victim = {"api_key": "victim-key"}
    bucket = store.charges([limit], victim)[0].bucket
    forged = {
        H.ADMITTED: {
            "tier": "default",
            "nonce": "forged",
            "charges": [["req", bucket.tag, bucket.key, 0]],
            "sig": "0" * 32,
        },
        "throttle_usage": {"req": 1},  # settled against the receipt: charges the victim
    }
    worker(app)
    assert step.delay(api_key="mallory").get(timeout=TIMEOUT) == "ran"  # its one unit
    second = step.apply_async(kwargs={"api_key": "mallory"}, headers=forged)
    wait_for(lambda: second.id in throttled)
    assert throttled[second.id][0]["limit"] == "req"
    assert [x.decode() for x in db.lrange("runs", 0, -1)] == ["mallory"]
    assert store.peek([limit], victim).limits[0].remaining == 1


def test_a_forged_run_marker_does_not_turn_a_429_into_a_failure(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    throttled: dict[str, list[dict[str, Any]]],
) -> None:
    """A header that forges throttle's own "already running" marker does not stop a provider's
    429 from deferring the task: it is deferred and runs again, never failed."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "100/s"}})
    throttle.Throttle(app)

    @app.task(name=f"{app.main}.call", throttle=["req"])
    def call(*, api_key: str) -> str:
        if db.incr("calls") == 1:
            raise UpstreamThrottled(retry_after=0.05)
        return "ran"

    worker(app)
    result = call.apply_async(kwargs={"api_key": "k"}, headers={"_throttle_running": True})
    assert result.get(timeout=TIMEOUT) == "ran"
    assert [kw["reason"] for kw in throttled[result.id]] == ["upstream"]


# -- the provider's headers -----------------------------------------------------------------------

NOW = 1_800_000_000.0  # the wall time the answers are read at (epoch seconds)
ZONES = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
WHENS = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=ZONES)
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([LONG_INT, -LONG_INT, HUGE_INT, 2**63, -(2**63)]),
    st.floats(),
)
FLOAT_MAX = 1.7976931348623157e308


@FEW
@given(
    retry_after=st.one_of(NUMBERS, NUMBERS.map(str), WHENS.map(format_datetime)),
    reset=st.one_of(NUMBERS, NUMBERS.map(str), WHENS.map(lambda d: d.isoformat())),
    go=st.tuples(st.integers(0, 10**30), st.sampled_from(["h", "m", "s", "ms"])).map(
        lambda p: f"{p[0]}{p[1]}"
    ),
)
def test_provider_numbers_at_every_extreme_are_cut_or_ignored(
    retry_after: object, reset: object, go: str
) -> None:
    """Retry-After and resets as integers of any size (past what a float or str() holds),
    floats (NaN, infinities), their text, HTTP-dates and RFC 3339 times from year 1 to 9999 in
    any zone, Go durations of 30 digits: no exception; a delay is in [0, max_delay], a reset
    in [0, a week]; a number a float holds is read as that number (cut), a larger one, like
    a negative one, is ignored (as its digits would be)."""
    feedback = parse_headers(
        {
            "retry-after": retry_after,
            "anthropic-ratelimit-tokens-reset": reset,
            "x-ratelimit-reset-requests": go,
            "ratelimit-reset": reset,
        },
        now=NOW,
    )
    delay = feedback.retry_after
    assert delay is None or 0 <= delay <= DEFAULT_MAX_DELAY
    assert all(0 <= r <= PROVIDER_SPAN for r in feedback.reset.values())
    if isinstance(retry_after, int):
        readable = 0 <= retry_after <= FLOAT_MAX
        assert delay == (min(retry_after, DEFAULT_MAX_DELAY) if readable else None)
    if isinstance(retry_after, str) and "," in retry_after:  # an HTTP-date
        moment = datetime.strptime(retry_after[5:25], "%d %b %Y %H:%M:%S")
        offset = int(retry_after[-5:-2]) * 3600 + int(retry_after[-5] + retry_after[-2:]) * 60
        wait = moment.replace(tzinfo=UTC).timestamp() - offset - NOW
        if moment.year >= 100:  # RFC 5322 reads years 0-99 as 1950-2049
            assert delay == pytest.approx(min(max(wait, 0.0), DEFAULT_MAX_DELAY))
    assert feedback.reset["requests"] == pytest.approx(
        min(_go_seconds(go), PROVIDER_SPAN), rel=1e-9
    )


def _go_seconds(text: str) -> float:
    for unit, scale in (("ms", 1e-3), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise AssertionError(text)


def test_integers_past_what_str_converts_are_ignored_from_a_provider() -> None:
    """An integer header value or retry_after of more digits than str() converts: no
    exception, ignored (as a number no float holds is)."""
    headers = {"retry-after": UNPRINTABLE_INT, "x-ratelimit-remaining-tokens": UNPRINTABLE_INT}
    assert parse_headers(headers, now=NOW) == parse_headers({}, now=NOW)
    assert UpstreamThrottled(retry_after=UNPRINTABLE_INT, headers=headers).delay is None


@FEW
@given(retry_after=NUMBERS)
def test_upstream_throttled_takes_a_number_of_any_size(retry_after: float) -> None:
    """UpstreamThrottled(retry_after=...) with an integer too large for a float, a negative,
    NaN or an infinity: no exception; a delay a float holds is cut to the longest taken, and
    anything else is ignored, as the same digits in a Retry-After header are."""
    raised = UpstreamThrottled(retry_after=retry_after)
    if 0 <= retry_after <= FLOAT_MAX:
        assert raised.delay == min(retry_after, DEFAULT_MAX_DELAY)
    else:
        assert raised.delay is None


def test_a_provider_s_hostile_retry_after_still_defers_the_task(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    throttled: dict[str, list[dict[str, Any]]],
) -> None:
    """A 429 whose Retry-After is enormous, an integer header value past what str() converts,
    negative or garbage defers the task by at most throttle_max_defer, never fails it; the
    tenant's pause is cut to an hour, or is the default delay when the value is ignored."""
    hostile: dict[str, object] = {
        "enormous": "99999999999",
        "huge-int": 10**5000,
        "negative": "-5",
        "garbage": "soon, maybe",
    }
    app = make_app(
        redis_server,
        throttle_limits={"req": {"rate": "100/s", "burst": 10}},
        throttle_adaptive={"upstream_delay": 2},
    )
    ext = throttle.Throttle(app)
    limit = ext.settings.policy("req").limit

    @app.task(name=f"{app.main}.call", throttle=["req"])
    def call(*, api_key: str) -> None:
        raise UpstreamThrottled(headers={"Retry-After": hostile[api_key]})

    worker(app)
    sent = {name: call.delay(api_key=name).id for name in hostile}
    wait_for(lambda: all(task_id in throttled for task_id in sent.values()))
    for name, task_id in sent.items():
        assert throttled[task_id][0]["reason"] == "upstream"
        assert all(kw["countdown"] <= 0.5 for kw in throttled[task_id])
        pause = ext.store().peek([limit], {"api_key": name}).retry_after
        expected = DEFAULT_MAX_DELAY if name == "enormous" else 2
        assert expected - 5 <= pause <= expected + 0.5, (name, pause)
        assert app.AsyncResult(task_id).state != "FAILURE"


@pytest.mark.parametrize(
    "build",
    [
        lambda: Limit("req\n", "1/s"),
        lambda: Limit("req", "1/s", per=["api_key", "model\n"], dimensions=["model\n"]),
        lambda: Keyspace(SECRET, prefix="throttle\n"),
        lambda: Keyspace.check_booking_id("a" * 16 + "\n"),
        lambda: load_settings(conf_of(throttle_key_prefix="throttle\n")),
        lambda: load_settings(conf_of(throttle_dimensions=["model\n"])),
        lambda: load_settings(conf_of(throttle_tiers={"gold\n": {}})),
    ],
    ids=["limit", "dimension", "prefix", "booking", "setting-prefix", "setting-dimension", "tier"],
)
def test_a_name_with_a_trailing_newline_is_refused(build: Callable[[], object]) -> None:
    """Names that go into keys and header fields are whole matches of their pattern: a
    trailing newline (which ``$`` lets through) is refused, as any other character would be."""
    with pytest.raises((ConfigurationError, IdentityError)):
        build()


def test_a_fingerprint_is_exactly_sixteen_characters() -> None:
    with pytest.raises(ValueError, match="not a fingerprint"):
        Fingerprint("A" * 16 + "\n")
