# SPDX-License-Identifier: MIT
"""Rates and limits: what may pass, how fast, counted in what, and per whom.

A :class:`Limit` is pure configuration: building one validates everything, so a malformed rate,
burst or dimension fails where it is written, not at the first admission. Limits know nothing of
Redis or Celery; stores turn them into buckets (see :mod:`throttle.store`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from throttle.errors import ConfigurationError, CostError

__all__ = [
    "ALGORITHMS",
    "BUILTIN_DIMENSIONS",
    "MAX_SPAN",
    "MAX_UNITS",
    "MIN_FACTOR",
    "Algorithm",
    "Limit",
    "Rate",
    "check_cost",
    "finite_number",
]

Algorithm = Literal["token_bucket", "sliding_window"]
ALGORITHMS: Final = ("token_bucket", "sliding_window")

#: The longest span of time throttle works with, in seconds (ten years): a rate's period, the
#: time a bucket takes to fill, a horizon, a lifetime, a settled debt. The scripts count in
#: microseconds from the epoch and Redis keys expire in milliseconds: ten years, even stretched
#: by the lowest factors (``MIN_FACTOR`` twice), stays within both.
MAX_SPAN: Final = 10 * 365 * 86400.0
#: The most units a bucket counts (a rate's count, a burst, a cost, a usage report): the
#: scripts answer in whole micro-units, which a 64-bit integer holds up to about 9.2e12.
MAX_UNITS: Final = 1e12
#: The lowest adaptive factor (the load's or the upstream one) a limit is multiplied by.
MIN_FACTOR: Final = 0.01

#: Dimensions every limit may be keyed by without declaring them. ``api_key`` is the billable
#: tenant; ``agent_id`` is only meaningful within an API key, so it requires ``api_key`` too.
BUILTIN_DIMENSIONS: Final = ("api_key", "agent_id", "tier")

_PERIOD_UNITS: Final = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE_FORMS: Final = (
    "'<count>/<period>' where count is a positive number and period is s, m, h or d "
    "(or second, minute, hour, day), optionally with a multiple: '100/m', '0.7/s', '30/10m'"
)
_RATE_RE: Final = re.compile(
    r"^\s*(?P<count>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*/\s*"
    r"(?P<mult>[0-9]*\.?[0-9]+)?\s*(?P<unit>[a-z]+)\s*$"
)
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_DIMENSION_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` units per ``period`` seconds. Both are positive and finite; ``count`` may be
    fractional (``0.7/s``) and is never rounded."""

    count: float
    period: float

    def __post_init__(self) -> None:
        for name, value in (("count", self.count), ("period", self.period)):
            number = finite_number(value)
            if number is None or number <= 0:
                raise ConfigurationError(
                    f"rate.{name}", f"must be a positive finite number, got {value!r}"
                )

    @classmethod
    def parse(cls, text: object, *, field: str = "rate") -> Rate:
        """Parse ``"100/m"``, ``"20/s"``, ``"5000/h"``, ``"1000000/d"``, ``"30/10m"``, ``"0.7/s"``.

        A :class:`Rate` is returned as is. Anything else raises :class:`ConfigurationError`
        naming ``field``.
        """
        if isinstance(text, Rate):
            return text
        if not isinstance(text, str):
            raise ConfigurationError(field, f"must be a string, got {text!r}", _RATE_FORMS)
        match = _RATE_RE.match(text.lower())
        unit = match["unit"] if match else ""
        if (
            unit not in _PERIOD_UNITS
            and unit.endswith("s")
            and len(unit) > 2
            and unit[:-1] in _PERIOD_UNITS
        ):
            unit = unit[:-1]  # plural: "minutes", "secs"; never "ms", which is not minutes
        if match is None or unit not in _PERIOD_UNITS:
            raise ConfigurationError(field, f"cannot parse {text!r}", _RATE_FORMS)
        count = float(match["count"])
        multiple = float(match["mult"]) if match["mult"] else 1.0
        if not math.isfinite(count) or count <= 0 or not math.isfinite(multiple) or multiple <= 0:
            raise ConfigurationError(
                field, f"{text!r}: count and period must be positive", _RATE_FORMS
            )
        return cls(count, multiple * _PERIOD_UNITS[unit])

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        """The rate as it would be written: ``60/m``, ``30/10m``, ``0.7/s``, ``5/90s``."""
        for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
            multiple = self.period / seconds
            if multiple >= 1 and multiple == int(multiple):
                head = "" if multiple == 1 else _compact(multiple)
                return f"{_compact(self.count)}/{head}{unit}"
        return f"{_compact(self.count)}/{_compact(self.period)}s"


@dataclass(frozen=True, slots=True)
class Limit:
    """One named limit.

    ``rate``
        How fast units are granted: a :class:`Rate` or its string form (``"100/m"``).
    ``burst``
        Token bucket capacity: how many units may pass at once after a quiet spell. Default:
        one period's worth (``rate.count``), at least 1. Must be at least ``max_cost``, at most
        :data:`MAX_UNITS`, and fill at ``rate`` within :data:`MAX_SPAN` (as must a period).
        Not used by ``sliding_window``, whose capacity is ``rate.count`` per rolling period.
    ``unit``
        What one unit of cost is (``"requests"``, ``"tokens"``, ``"cents"``): for display only.
    ``per``
        The dimensions the limit is keyed by: each distinct combination of their values gets
        its own bucket. ``()`` is a single global bucket. Built-ins are ``api_key``,
        ``agent_id`` (within its ``api_key``) and ``tier``; other names must be declared with
        ``dimensions=``.
    ``algorithm``
        ``"token_bucket"`` (GCRA: smooth, allows ``burst`` at once) or ``"sliding_window"``
        (a log that counts exactly within any rolling ``rate.period``; costs memory per
        admission, so prefer it for low counts).
    ``max_cost``
        The largest single cost that will be charged, checked against ``burst`` now rather than
        at the first oversized admission.
    ``anonymous``
        The value used for a dimension the caller's identity lacks: work with no API key is
        throttled together under this value, never silently unthrottled.
    ``adaptive``
        Whether the limit tightens with the adaptive factors (worker load, and for a limit
        keyed by ``api_key`` its tenant's upstream factor) when an admission asks for them.
        ``False`` keeps it fixed (an admin tier, a hard budget).
    """

    name: str
    rate: Rate
    burst: float
    unit: str = "requests"
    per: tuple[str, ...] = ("api_key",)
    algorithm: Algorithm = "token_bucket"
    max_cost: float = 1.0
    anonymous: str = "anonymous"
    adaptive: bool = True
    #: True when the limit has no tenant (``api_key``) dimension: one bucket shared by all
    #: tenants, or one per value of a non-tenant dimension such as ``model``.
    is_global: bool = field(default=False, compare=False)
    #: The parameters as the store scripts take them: algorithm code, period in microseconds,
    #: count, burst. Computed once here so the hot path only formats the cost.
    wire: tuple[str, str, str, str] = field(default=("", "", "", ""), compare=False, repr=False)
    #: The same for an admission that applies the adaptive factors: the algorithm code says
    #: which factors this limit follows.
    wire_adaptive: tuple[str, str, str, str] = field(
        default=("", "", "", ""), compare=False, repr=False
    )

    def __init__(
        self,
        name: str,
        rate: Rate | str,
        *,
        burst: float | None = None,
        unit: str = "requests",
        per: tuple[str, ...] | list[str] | str = ("api_key",),
        algorithm: str = "token_bucket",
        max_cost: float = 1.0,
        anonymous: str = "anonymous",
        adaptive: bool = True,
        dimensions: tuple[str, ...] | list[str] = (),
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigurationError(
                "name",
                f"invalid limit name {name!r}",
                "1 to 64 characters of letters, digits, '_', '.', '-', starting with a letter "
                "or digit",
            )
        where = f"limit {name!r}"
        parsed_rate = Rate.parse(rate, field=f"{where}: rate")
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"{where}: algorithm", f"unknown algorithm {algorithm!r}", " or ".join(ALGORITHMS)
            )
        largest = finite_number(max_cost)
        if largest is None or largest <= 0:
            raise ConfigurationError(
                f"{where}: max_cost", f"must be a positive finite number, got {max_cost!r}"
            )
        if algorithm == "sliding_window":
            if burst is not None:
                raise ConfigurationError(
                    f"{where}: burst",
                    "does not apply to sliding_window, whose capacity is the rate's count",
                    "leave burst unset, or use algorithm='token_bucket'",
                )
            capacity = parsed_rate.count
        elif burst is None:
            capacity = max(parsed_rate.count, 1.0)
        else:
            given = finite_number(burst)
            if given is None or given <= 0:
                raise ConfigurationError(
                    f"{where}: burst", f"must be a positive finite number, got {burst!r}"
                )
            capacity = given
        _check_range(where, parsed_rate, capacity, "rate" if burst is None else "burst")
        if capacity < largest:
            raise ConfigurationError(
                f"{where}: burst",
                f"capacity {_compact(capacity)} is below the largest single cost "
                f"{_compact(largest)}, so such work could never be admitted",
                "a burst (or sliding_window count) of at least max_cost",
            )
        dims = _parse_dimensions(per, dimensions, where)
        if not isinstance(unit, str) or not unit:
            raise ConfigurationError(f"{where}: unit", f"must be a non-empty string, got {unit!r}")
        if not isinstance(anonymous, str) or not anonymous:
            raise ConfigurationError(
                f"{where}: anonymous", f"must be a non-empty string, got {anonymous!r}"
            )
        if not isinstance(adaptive, bool):
            raise ConfigurationError(
                f"{where}: adaptive", f"must be True or False, got {adaptive!r}"
            )
        code = "t" if algorithm == "token_bucket" else "w"
        wire = (
            code,
            f"{parsed_rate.period * 1_000_000:.17g}",
            f"{parsed_rate.count:.17g}",
            f"{capacity:.17g}",
        )
        if adaptive:
            follows = code + ("k" if "api_key" in dims else "a")
            wire_adaptive = (follows, wire[1], wire[2], wire[3])
        else:
            wire_adaptive = wire
        # frozen dataclass: assign through object.__setattr__ once, here.
        for attr, value in (
            ("name", name),
            ("rate", parsed_rate),
            ("burst", capacity),
            ("unit", unit),
            ("per", dims),
            ("algorithm", algorithm),
            ("max_cost", largest),
            ("anonymous", anonymous),
            ("adaptive", adaptive),
            ("is_global", "api_key" not in dims),
            ("wire", wire),
            ("wire_adaptive", wire_adaptive),
        ):
            object.__setattr__(self, attr, value)

    def share(self, parts: int) -> Limit:
        """This limit at ``1/parts`` of its rate and burst (never below its largest cost): the
        part one of ``parts`` processes may admit on its own, in-process, while the store is
        away, so that together they admit no more than the limit."""
        if parts <= 1:
            return self
        burst = max(self.burst / parts, self.max_cost)
        count, period = self.rate.count / parts, self.rate.period
        extra: dict[str, Any] = {"burst": burst}
        if self.algorithm == "sliding_window":
            # A window's capacity is its count: one too small for the largest cost becomes
            # that cost over a window stretched to keep the rate.
            extra = {}
            if count < self.max_cost:
                count, period = self.max_cost, period * self.max_cost / count
        return Limit(
            self.name,
            f"{count!r}/{period!r}s",
            per=self.per,
            algorithm=self.algorithm,
            unit=self.unit,
            max_cost=min(self.max_cost, burst),
            anonymous=self.anonymous,
            adaptive=self.adaptive,
            dimensions=[d for d in self.per if d not in BUILTIN_DIMENSIONS],
            **extra,
        )

    def __str__(self) -> str:
        per = ",".join(self.per) or "global"
        return f"{self.name} ({self.rate} {self.unit}, burst {_compact(self.burst)}, per {per})"


def check_cost(limit: Limit, cost: object) -> float:
    """Return ``cost`` as a float if ``limit`` can ever admit it, else raise :class:`CostError`.

    Zero is allowed (it checks without charging). A cost above the limit's capacity is an error
    rather than an endless denial.
    """
    if not _is_number(cost):
        raise CostError(limit.name, cost, "must be a number")
    if isinstance(cost, float) and not math.isfinite(cost):
        raise CostError(limit.name, cost, "must be finite")
    # Compared before any conversion: an int too large for a float is just too large.
    if cost < 0:  # type: ignore[operator]
        raise CostError(limit.name, cost, "must not be negative")
    if cost > limit.burst:  # type: ignore[operator]
        raise CostError(
            limit.name,
            cost,
            f"exceeds the limit's capacity of {_compact(limit.burst)} {limit.unit}, "
            "so it could never be admitted",
        )
    return float(cost)  # type: ignore[arg-type]


def finite_number(value: object) -> float | None:
    """``value`` as a float if it is an int or a float (not a bool) of finite value, else None,
    also for an int too large for a float (where ``float()`` and ``math.isfinite`` raise)."""
    if not _is_number(value):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _check_range(where: str, rate: Rate, capacity: float, field: str) -> None:
    """Refuse a limit the stores cannot keep: more than MAX_UNITS units, a period or a time to
    fill the bucket longer than MAX_SPAN."""
    if rate.count > MAX_UNITS:
        raise ConfigurationError(
            f"{where}: rate",
            f"a count of {_compact(rate.count)} is more than the {MAX_UNITS:g} units a bucket "
            "counts",
            _RATE_FORMS,
        )
    if rate.period > MAX_SPAN:
        raise ConfigurationError(
            f"{where}: rate",
            f"a period of {_compact(rate.period)} s is longer than {MAX_SPAN:g} s (ten years)",
            _RATE_FORMS,
        )
    if capacity > MAX_UNITS:
        raise ConfigurationError(
            f"{where}: burst", f"{_compact(capacity)} is more than {MAX_UNITS:g} units"
        )
    fill = capacity / rate.per_second
    if fill > MAX_SPAN:
        raise ConfigurationError(
            f"{where}: {field}",
            f"a bucket of {_compact(capacity)} takes {fill:g} s to fill at {rate}, longer than "
            f"{MAX_SPAN:g} s (ten years)",
            "a faster rate or a smaller burst",
        )


def _parse_dimensions(
    per: object, declared: tuple[str, ...] | list[str], where: str
) -> tuple[str, ...]:
    if isinstance(per, str):
        per = (per,)
    if not isinstance(per, tuple | list):
        raise ConfigurationError(f"{where}: per", f"must be a list of dimension names, got {per!r}")
    known = set(BUILTIN_DIMENSIONS)
    for name in declared:
        if not isinstance(name, str) or not _DIMENSION_RE.match(name):
            raise ConfigurationError(
                "dimensions", f"invalid dimension name {name!r}", "lowercase identifiers"
            )
        known.add(name)
    seen: list[str] = []
    for name in per:
        if name not in known:
            raise ConfigurationError(
                f"{where}: per",
                f"unknown dimension {name!r}",
                ", ".join(sorted(known)) + " (declare custom dimensions first)",
            )
        if name in seen:
            raise ConfigurationError(f"{where}: per", f"dimension {name!r} is listed twice")
        seen.append(name)
    if "agent_id" in seen and "api_key" not in seen:
        raise ConfigurationError(
            f"{where}: per",
            "agent_id is only unique within an API key",
            "per=['api_key', 'agent_id']",
        )
    # A canonical order keeps the bucket key the same however the user listed the dimensions.
    order = {name: i for i, name in enumerate(BUILTIN_DIMENSIONS)}
    return tuple(sorted(seen, key=lambda d: (order.get(d, len(order)), d)))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compact(value: float) -> str:
    return f"{value:g}" if value != int(value) or abs(value) >= 1e15 else str(int(value))
