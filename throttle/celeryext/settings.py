# SPDX-License-Identifier: MIT
"""``throttle_*`` settings: read once per Celery app, validated, frozen.

Every key is documented in the README with its default. An unknown ``throttle_*`` key, a value
of the wrong type or range, a malformed limit or tier, or a resolver path that does not import
raises :class:`~throttle.errors.ConfigurationError` naming the key, when ``Throttle(app)`` runs.
Django-style ``CELERY_THROTTLE_*`` names work through Celery's settings namespace.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from redis.connection import parse_url

from throttle.adaptive.policy import LoadPolicy
from throttle.errors import ConfigurationError
from throttle.limits import MAX_SPAN, MIN_FACTOR, Limit, finite_number

__all__ = [
    "DEFAULT_TIER",
    "AdaptiveSettings",
    "LimitPolicy",
    "ThrottleSettings",
    "load_settings",
    "redact_url",
]

StoreErrorPolicy = Literal["open", "closed", "local"]
STORE_ERROR_POLICIES: Final = ("open", "closed", "local")
MODES: Final = ("enforce", "shadow")
DEFAULT_TIER: Final = "default"

#: A development-only secret, used only with ``throttle_insecure_dev_secret=True``.
_DEV_SECRET: Final = "throttle-insecure-development-secret-do-not-use"

_LIMIT_KEYS: Final = frozenset(
    {
        "rate",
        "burst",
        "unit",
        "per",
        "algorithm",
        "max_cost",
        "anonymous",
        "mode",
        "on_store_error",
        "adaptive",
        "upstream",
    }
)
_TIER_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
_DIMENSION_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
_SECONDS: Final = f"seconds > 0, at most {MAX_SPAN:g} (ten years)"


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """A limit as the gate applies it: the core :class:`Limit` plus how it is enforced."""

    limit: Limit
    #: ``enforce`` denies; ``shadow`` is evaluated and counted but never denies.
    mode: str = "enforce"
    #: What the gate does with this limit while Redis does not answer.
    on_store_error: StoreErrorPolicy = "local"
    #: What the upstream provider calls the quantity this limit counts ("requests", "tokens",
    #: an IETF policy name): its "remaining" answers bring this limit's bucket down.
    upstream: str | None = None

    @property
    def name(self) -> str:
        return self.limit.name


@dataclass(frozen=True)
class ThrottleSettings:
    """Everything ``throttle`` reads from ``app.conf``, validated."""

    redis_url: str
    redis_cluster: bool
    key_secret: bytes = field(repr=False)
    key_prefix: str
    #: tier name -> limit name -> policy. Every tier holds every limit (overrides applied).
    tiers: Mapping[str, Mapping[str, LimitPolicy]]
    tier_resolver: Callable[[Mapping[str, object]], str | None] | None
    dimensions: tuple[str, ...]
    max_defer: float
    max_deferrals: int | None
    horizon: float
    booking_grace: float
    socket_timeout: float
    store_retry: float
    guard_ttl: float
    heartbeat_interval: float
    #: How long the per-key traffic counts are kept (seconds; 0: not kept).
    counts_retention: float = 3600.0
    adaptive: AdaptiveSettings = field(default_factory=lambda: AdaptiveSettings())

    def policy(self, name: str, tier: str = DEFAULT_TIER) -> LimitPolicy:
        """The policy of limit ``name`` in ``tier`` (an unknown tier falls back to default)."""
        return self.tiers.get(tier, self.tiers[DEFAULT_TIER])[name]

    @property
    def limit_names(self) -> frozenset[str]:
        return frozenset(self.tiers[DEFAULT_TIER])

    def __repr__(self) -> str:
        return (
            f"ThrottleSettings(redis_url={redact_url(self.redis_url)!r}, "
            f"limits={sorted(self.limit_names)}, tiers={sorted(self.tiers)})"
        )


#: Every accepted key, its default, and what it takes (for errors and the README).
KNOWN: Final[dict[str, tuple[object, str]]] = {
    "throttle_redis_url": (None, "a redis://, rediss:// or unix:// URL; default: the broker URL"),
    "throttle_redis_cluster": (False, "True when throttle_redis_url names a Redis Cluster node"),
    "throttle_key_secret": (None, "a secret string of at least 16 characters"),
    "throttle_insecure_dev_secret": (False, "True to use a fixed development secret"),
    "throttle_key_prefix": ("throttle", "a key prefix without braces"),
    "throttle_limits": ({}, "a dict of limit name -> {rate, burst, unit, per, ...}"),
    "throttle_tiers": ({}, "a dict of tier name -> {limit name -> overrides}"),
    "throttle_tier_resolver": (None, "'module:function' or a callable(identity) -> tier"),
    "throttle_dimensions": (
        (),
        "a list of custom dimension names (lowercase identifiers, at most 32 characters)",
    ),
    "throttle_max_defer": (300.0, f"{_SECONDS}, well below the broker's visibility timeout"),
    "throttle_max_deferrals": (None, "None (unlimited) or an integer >= 1"),
    "throttle_booking_horizon": (3600.0, _SECONDS),
    # Short: a copy that comes back later than this after its slot (one a dead worker held,
    # restored late) is checked as a fresh arrival, so late copies do not run in a burst.
    "throttle_booking_grace": (2.0, _SECONDS),
    "throttle_on_store_error": ("local", "'open', 'closed' or 'local'"),
    "throttle_socket_timeout": (0.25, _SECONDS),
    "throttle_store_retry": (1.0, _SECONDS),
    "throttle_guard_ttl": (
        None,
        f"{_SECONDS}; default: the longest a dead worker's message can take to come back "
        "(visibility timeout + restore sweep + 2 x max_defer), at least an hour",
    ),
    "throttle_heartbeat_interval": (5.0, _SECONDS),
    "throttle_adaptive": (
        {},
        "a dict with any of: enabled (bool), cpu and memory ([[percent, factor], ...]), busy "
        "([[share, factor], ...]), signals ({name: callable or 'module:function'} returning a "
        f"load in [0, 1]), signal_thresholds, floor (in [{MIN_FACTOR:g}, 1]), step (in (0, 1]), "
        "relax (seconds), upstream_decrease, upstream_step (in (0, 1]), upstream_floor (in "
        f"[{MIN_FACTOR:g}, 1]), upstream_ttl, upstream_quiet, upstream_delay (seconds)",
    ),
    "throttle_load_interval": (1.0, _SECONDS),
    "throttle_counts_retention": (
        3600.0,
        f"seconds from 60 to {MAX_SPAN:g} that per-key traffic counts are kept for "
        "`celery throttle suggest`, or 0 to keep none",
    ),
}


def load_settings(conf: Any) -> ThrottleSettings:
    """Read and validate the ``throttle_*`` settings of a Celery app's ``conf``."""
    present = _present_keys(conf)
    for key in present:
        if key not in KNOWN:
            raise ConfigurationError(key, "unknown throttle setting", ", ".join(sorted(KNOWN)))

    def get(key: str) -> Any:
        value = conf.get(key) if key in present else None
        return KNOWN[key][0] if value is None else value

    prefix = get("throttle_key_prefix")
    _expect("throttle_key_prefix", prefix, isinstance(prefix, str) and _PREFIX_RE.match(prefix))
    dimensions = get("throttle_dimensions")
    _expect(
        "throttle_dimensions",
        dimensions,
        isinstance(dimensions, list | tuple)
        and all(isinstance(d, str) and _DIMENSION_RE.match(d) for d in dimensions),
    )
    default_policy = get("throttle_on_store_error")
    _expect("throttle_on_store_error", default_policy, default_policy in STORE_ERROR_POLICIES)
    max_defer = _seconds(get, "throttle_max_defer")
    _check_visibility(conf, max_defer)
    guard_ttl = (
        min(MAX_SPAN, max(3600.0, _redelivery_delay(conf) + 2 * max_defer))
        if get("throttle_guard_ttl") is None
        else _seconds(get, "throttle_guard_ttl")
    )
    max_deferrals = get("throttle_max_deferrals")
    _expect(
        "throttle_max_deferrals",
        max_deferrals,
        max_deferrals is None or (type(max_deferrals) is int and max_deferrals >= 1),
    )
    cluster = get("throttle_redis_cluster")
    _expect("throttle_redis_cluster", cluster, isinstance(cluster, bool))
    dev = get("throttle_insecure_dev_secret")
    _expect("throttle_insecure_dev_secret", dev, isinstance(dev, bool))
    return ThrottleSettings(
        redis_url=_redis_url(get("throttle_redis_url"), conf),
        redis_cluster=cluster,
        key_secret=_secret(get("throttle_key_secret"), dev),
        key_prefix=prefix,
        tiers=_tiers(
            get("throttle_limits"), get("throttle_tiers"), tuple(dimensions), default_policy
        ),
        tier_resolver=_resolver(get("throttle_tier_resolver")),
        dimensions=tuple(dimensions),
        max_defer=max_defer,
        max_deferrals=max_deferrals,
        horizon=_seconds(get, "throttle_booking_horizon"),
        booking_grace=_seconds(get, "throttle_booking_grace"),
        socket_timeout=_seconds(get, "throttle_socket_timeout"),
        store_retry=_seconds(get, "throttle_store_retry"),
        guard_ttl=guard_ttl,
        heartbeat_interval=_seconds(get, "throttle_heartbeat_interval"),
        counts_retention=_retention(get("throttle_counts_retention")),
        adaptive=_adaptive(get("throttle_adaptive"), _seconds(get, "throttle_load_interval")),
    )


def _tiers(
    limits_conf: object, tiers_conf: object, dimensions: tuple[str, ...], default_policy: str
) -> dict[str, dict[str, LimitPolicy]]:
    """Every tier's policies: the default tier from ``throttle_limits``, each other tier the
    same with its overrides merged in."""
    if not isinstance(limits_conf, Mapping):
        raise ConfigurationError(
            "throttle_limits", f"got {limits_conf!r}", KNOWN["throttle_limits"][1]
        )
    if not isinstance(tiers_conf, Mapping):
        raise ConfigurationError(
            "throttle_tiers", f"got {tiers_conf!r}", KNOWN["throttle_tiers"][1]
        )
    specs: dict[str, Mapping[str, Any]] = {}
    default: dict[str, LimitPolicy] = {}
    for name, spec in limits_conf.items():
        where = f"throttle_limits[{name!r}]"
        if not isinstance(spec, Mapping):
            raise ConfigurationError(where, f"must be a dict, got {spec!r}", "{'rate': '100/m'}")
        specs[name] = spec
        default[name] = build_policy(name, spec, where, dimensions, default_policy)
    tiers = {DEFAULT_TIER: default}
    for tier, overrides in tiers_conf.items():
        where = f"throttle_tiers[{tier!r}]"
        if not isinstance(tier, str) or not _TIER_RE.match(tier):
            raise ConfigurationError(where, "invalid tier name", "letters, digits, '_', '.', '-'")
        if not isinstance(overrides, Mapping):
            raise ConfigurationError(where, f"must be a dict, got {overrides!r}")
        policies = dict(default)
        for name, override in overrides.items():
            if name not in specs:
                raise ConfigurationError(
                    f"{where}[{name!r}]",
                    "overrides a limit that throttle_limits does not define",
                    ", ".join(sorted(specs)) or "(no limits defined)",
                )
            if not isinstance(override, Mapping):
                raise ConfigurationError(f"{where}[{name!r}]", f"must be a dict, got {override!r}")
            merged = {**specs[name], **override}
            policies[name] = build_policy(
                name, merged, f"{where}[{name!r}]", dimensions, default_policy
            )
        tiers[tier] = policies
    return tiers


@dataclass(frozen=True)
class AdaptiveSettings:
    """``throttle_adaptive`` and ``throttle_load_interval``, validated."""

    enabled: bool = True
    policy: LoadPolicy = field(default_factory=LoadPolicy)
    #: Custom load signals: name -> callable returning a load in [0, 1].
    signals: Mapping[str, Callable[[], float]] = field(default_factory=dict)
    interval: float = 1.0
    #: A provider's 429 multiplies the key's upstream factor by this, never below the floor;
    #: each success adds step; ttl seconds without news bring it back to 1.
    upstream_decrease: float = 0.5
    upstream_step: float = 0.05
    upstream_floor: float = 0.05
    upstream_ttl: float = 3600.0
    #: After a cut (and its hold), successes do not raise the factor for this long: the work
    #: deferred meanwhile is booked at the lower rate.
    upstream_quiet: float = 10.0
    #: The deferral when a 429 does not say how long to wait.
    upstream_delay: float = 1.0


_ADAPTIVE_KEYS: Final = frozenset(
    {
        "enabled",
        "cpu",
        "memory",
        "busy",
        "signals",
        "signal_thresholds",
        "floor",
        "step",
        "relax",
        "upstream_decrease",
        "upstream_step",
        "upstream_floor",
        "upstream_ttl",
        "upstream_quiet",
        "upstream_delay",
    }
)


def _adaptive(value: object, interval: float) -> AdaptiveSettings:
    key = "throttle_adaptive"
    if not isinstance(value, Mapping):
        raise ConfigurationError(key, f"got {value!r}", KNOWN[key][1])
    unknown = set(value) - _ADAPTIVE_KEYS
    if unknown:
        raise ConfigurationError(
            f"{key}.{sorted(unknown)[0]}", "unknown field", ", ".join(sorted(_ADAPTIVE_KEYS))
        )
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigurationError(f"{key}.enabled", f"got {enabled!r}", "True or False")
    signals_conf = value.get("signals", {})
    if not isinstance(signals_conf, Mapping):
        raise ConfigurationError(
            f"{key}.signals", f"got {signals_conf!r}", "{name: callable or 'module:function'}"
        )
    signals = {
        str(name): _callable(target, f"{key}.signals[{name!r}]")
        for name, target in signals_conf.items()
    }
    numbers: dict[str, float] = {}
    for name, low in (
        ("upstream_decrease", "fraction"),
        ("upstream_step", "fraction"),
        ("upstream_floor", "fraction"),
        ("upstream_ttl", "seconds"),
        ("upstream_quiet", "seconds"),
        ("upstream_delay", "seconds"),
    ):
        if name not in value:
            continue
        raw = value[name]
        number = finite_number(raw)
        least = MIN_FACTOR if name == "upstream_floor" else 0.0
        most = 1.0 if low == "fraction" else MAX_SPAN
        if number is None or not (least <= number <= most and number > 0):
            if low == "seconds":
                accepted = _SECONDS
            else:
                accepted = f"a number in [{least:g}, 1]" if least else "a number in (0, 1]"
            raise ConfigurationError(f"{key}.{name}", f"got {raw!r}", accepted)
        numbers[name] = number
    return AdaptiveSettings(
        enabled=enabled,
        policy=LoadPolicy.from_settings(value, key),
        signals=signals,
        interval=interval,
        **numbers,
    )


def _callable(value: object, where: str) -> Callable[[], float]:
    """A callable, or one named by 'module:attribute'."""
    if callable(value):
        return value
    if not isinstance(value, str) or ":" not in value:
        raise ConfigurationError(where, f"got {value!r}", "a callable or 'module:function'")
    module_name, _, attr = value.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # not found, a relative or empty name, or the module failed
        raise ConfigurationError(
            where, f"cannot import {value!r}: {exc!r}", "a callable or 'module:function'"
        ) from exc
    if not callable(target):
        raise ConfigurationError(where, f"{value!r} is not callable")
    return target  # type: ignore[no-any-return]


def _expect(key: str, value: object, ok: object) -> None:
    """Raise the standard error for setting ``key`` unless ``ok``."""
    if not ok:
        shown = redact_url(value) if isinstance(value, str) else repr(value)
        raise ConfigurationError(key, f"got {shown}", KNOWN[key][1])


def build_policy(
    name: str,
    spec: Mapping[str, Any],
    where: str,
    dimensions: tuple[str, ...],
    default_policy: str = "local",
) -> LimitPolicy:
    """Build one limit's policy from its settings dict; errors name ``where`` and the field."""
    unknown = set(spec) - _LIMIT_KEYS
    if unknown:
        raise ConfigurationError(
            f"{where}.{sorted(unknown)[0]}", "unknown field", ", ".join(sorted(_LIMIT_KEYS))
        )
    if "rate" not in spec:
        raise ConfigurationError(f"{where}.rate", "is required", "'100/m', '20/s', '30/10m'")
    mode = spec.get("mode", "enforce")
    if mode not in MODES:
        raise ConfigurationError(f"{where}.mode", f"unknown mode {mode!r}", " or ".join(MODES))
    policy = spec.get("on_store_error", default_policy)
    if policy not in STORE_ERROR_POLICIES:
        raise ConfigurationError(
            f"{where}.on_store_error", f"unknown policy {policy!r}", ", ".join(STORE_ERROR_POLICIES)
        )
    upstream = spec.get("upstream")
    if upstream is not None and (not isinstance(upstream, str) or not upstream):
        raise ConfigurationError(
            f"{where}.upstream",
            f"got {upstream!r}",
            "the provider's name for what this limit counts: 'requests', 'tokens', ...",
        )
    kwargs = {
        k: v for k, v in spec.items() if k not in ("rate", "mode", "on_store_error", "upstream")
    }
    try:
        limit = Limit(name, spec["rate"], dimensions=dimensions, **kwargs)
    except ConfigurationError as exc:
        # "limit 'x': burst" -> "throttle_limits['x'].burst"
        sub = exc.field.split(": ", 1)[-1]
        raise ConfigurationError(
            f"{where}.{sub}" if sub != "name" else where, exc.problem, exc.accepted
        ) from exc
    except TypeError as exc:
        raise ConfigurationError(where, str(exc)) from exc
    return LimitPolicy(limit, mode, policy, upstream)


def redact_url(url: str) -> str:
    """``url`` with its password, and any ``password`` or ``ssl_password`` in its query
    (redis-py takes them from there too), replaced by ``***``, for logs, errors and reprs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    userinfo, at, host = parts.netloc.rpartition("@")
    # The host part as written: an IPv6 address keeps its brackets, a bad port stays.
    netloc = f"{userinfo.partition(':')[0]}:***@{host}" if at and ":" in userinfo else None
    query = "&".join(map(_redact_field, parts.query.split("&")))
    if netloc is None and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc or parts.netloc, query=query))


def _redact_field(field: str) -> str:
    name, eq, _ = field.partition("=")
    return f"{name}=***" if eq and "password" in unquote(name).lower() else field


def _present_keys(conf: Any) -> set[str]:
    """The throttle settings ``conf`` holds, by their canonical names. One spelt so that Celery
    never hands it over (``THROTTLE_LIMITS``, or ``CELERY_THROTTLE_LIMITS`` without the CELERY
    namespace) is an error naming it as written: its value would otherwise be ignored."""
    found = set()
    for key in list(conf.keys()):
        spelt = str(key)
        low = spelt.lower()
        if low.startswith("celery_throttle_"):
            low = low[len("celery_") :]
        if not low.startswith("throttle_"):
            continue
        if low in KNOWN and spelt != low and conf.get(low) is not conf.get(spelt):
            raise ConfigurationError(
                spelt,
                "is never read: Celery hands over a throttle setting only as spelt here",
                f"{low!r} (or, through config_from_object(..., namespace='CELERY'), "
                f"{'CELERY_' + low.upper()!r})",
            )
        found.add(low)
    return found


def _redis_url(value: object, conf: Any) -> str:
    if value is None:
        broker = conf.get("broker_url") or ""
        if isinstance(broker, str) and urlsplit(broker).scheme in ("redis", "rediss", "unix"):
            return broker
        raise ConfigurationError(
            "throttle_redis_url",
            "is required when the broker is not Redis",
            KNOWN["throttle_redis_url"][1],
        )
    if not isinstance(value, str):
        raise ConfigurationError(
            "throttle_redis_url", f"not a string: {value!r}", KNOWN["throttle_redis_url"][1]
        )
    problem = ""
    try:  # as redis-py reads it when the store connects
        parts: dict[str, Any] = parse_url(value)  # type: ignore[no-untyped-call]
        path = urlsplit(value).path.strip("/")
    except ValueError as exc:
        problem = str(exc)
    else:
        if value.startswith("unix://") and "path" not in parts:
            problem = "no socket path"
        elif not value.startswith("unix://") and path and not path.isdigit():
            problem = f"the database must be a number, got {path!r}"
    if problem:
        raise ConfigurationError(
            "throttle_redis_url",
            f"not a Redis URL ({problem}): {redact_url(value)}",
            KNOWN["throttle_redis_url"][1],
        )
    return value


def _secret(value: object, dev: object) -> bytes:
    if value is None:
        if dev is True:
            return _DEV_SECRET.encode()
        raise ConfigurationError(
            "throttle_key_secret",
            "is required: API keys are stored only as fingerprints keyed by this secret",
            "a random string of at least 16 characters (or, for development only, "
            "throttle_insecure_dev_secret=True)",
        )
    if not isinstance(value, str | bytes) or len(value) < 16:
        # Never echo the value: it is (or is meant to be) a secret.
        raise ConfigurationError(
            "throttle_key_secret", "must be at least 16 characters", KNOWN["throttle_key_secret"][1]
        )
    return value.encode() if isinstance(value, str) else value


def _seconds(get: Callable[[str], Any], key: str) -> float:
    value = get(key)
    number = finite_number(value)
    _expect(key, value, number is not None and 0 < number <= MAX_SPAN)
    return float(value)


def _retention(value: Any) -> float:
    number = finite_number(value)
    ok = number is not None and (number == 0 or 60 <= number <= MAX_SPAN)
    _expect("throttle_counts_retention", value, ok)
    return float(value)


def _transport_seconds(conf: Any, name: str, default: float) -> float:
    """A number of seconds from Celery's ``broker_transport_options`` (read to size deferrals
    and guards)."""
    options = conf.get("broker_transport_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError("broker_transport_options", f"got {options!r}", "a dict")
    value = options.get(name, default)
    number = finite_number(value)
    if number is None or number < 0:
        raise ConfigurationError(
            f"broker_transport_options[{name!r}]", f"got {value!r}", "seconds >= 0"
        )
    return number


def _visibility_timeout(conf: Any) -> float:
    return _transport_seconds(conf, "visibility_timeout", 3600)


def _redelivery_delay(conf: Any) -> float:
    """How long an unacknowledged message of a dead worker can take to be delivered again on a
    Redis broker: the visibility timeout plus kombu's restore sweep period."""
    sweep = _transport_seconds(conf, "unacked_restore_interval", 10) * _transport_seconds(
        conf, "unacked_restore_throttle", 10
    )
    return _visibility_timeout(conf) + sweep


def _check_visibility(conf: Any, max_defer: float) -> None:
    broker = conf.get("broker_url") or ""
    scheme = urlsplit(broker).scheme if isinstance(broker, str) else ""
    if scheme not in ("redis", "rediss", "sqs", "unix", "sentinel"):
        return  # AMQP brokers hold unacked messages until the connection drops
    visibility = _visibility_timeout(conf)
    if max_defer > visibility / 2:
        raise ConfigurationError(
            "throttle_max_defer",
            f"{max_defer:g} s is not well below the broker's visibility timeout of "
            f"{visibility:g} s: a deferred task held that long would be delivered twice",
            f"at most half the visibility timeout ({visibility / 2:g} s)",
        )


def _resolver(value: object) -> Callable[[Mapping[str, object]], str | None] | None:
    if value is None:
        return None
    _expect("throttle_tier_resolver", value, callable(value) or isinstance(value, str))
    return _callable(value, "throttle_tier_resolver")  # type: ignore[return-value]
