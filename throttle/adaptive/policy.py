# SPDX-License-Identifier: MIT
"""From worker load samples to the factor every adaptive limit's refill rate is multiplied by.

Each worker samples its host (:mod:`throttle.adaptive.sampler`) and the store keeps the live
samples of the whole cluster. The policy looks at the hottest live worker for each signal and
maps it through that signal's ladder of thresholds; the lowest factor wins. With the defaults:
above 90% CPU the factor is 0.25, above 75% it is 0.5, above 60% it is 0.75, else 1.0, and the
same for memory. Custom signals report a load in [0, 1] (a database pool's utilisation, an LLM
call's p95 latency over its target) and share one ladder (0.9, 0.75, 0.6 by default).

The policy gives a target; the store applies hysteresis to it (falls at once, rises one
``step`` per ``relax`` seconds, never below ``floor``), so that every worker's report moves one
shared factor (:meth:`throttle.store.base.BaseStore.report_load`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from throttle.errors import ConfigurationError
from throttle.limits import MAX_SPAN, MIN_FACTOR, finite_number

__all__ = ["DEFAULT_LADDER", "DEFAULT_SIGNAL_LADDER", "LoadPolicy", "Sample"]

#: (threshold, factor) pairs for CPU and memory percentages: above the threshold, the factor.
DEFAULT_LADDER: tuple[tuple[float, float], ...] = ((90.0, 0.25), (75.0, 0.5), (60.0, 0.75))
#: The same for custom signals, which report a load in [0, 1].
DEFAULT_SIGNAL_LADDER: tuple[tuple[float, float], ...] = ((0.9, 0.25), (0.75, 0.5), (0.6, 0.75))


@dataclass(frozen=True)
class Sample:
    """One worker's load at one moment: CPU and memory in percent, the share of its pool slots
    that are busy (0 to 1), and custom signals (name -> load in [0, 1])."""

    worker: str
    cpu: float
    memory: float
    busy: float = 0.0
    signals: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"w": self.worker, "c": self.cpu, "m": self.memory, "b": self.busy, "s": self.signals},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Sample | None:
        """A sample as another worker wrote it; None if it is not one (never raises)."""
        try:
            data = json.loads(text)
            signals = {str(k): _unit(v) for k, v in dict(data.get("s") or {}).items()}
            return cls(
                str(data["w"]),
                _percent(data["c"]),
                _percent(data["m"]),
                _unit(data.get("b", 0.0)),
                signals,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


@dataclass(frozen=True)
class LoadPolicy:
    """How samples become a target factor, and how the shared factor moves toward it.

    ``cpu`` and ``memory`` are ladders of (percent threshold, factor); ``busy`` (off by default)
    a ladder over the share of busy pool slots; ``signals`` the ladder for custom signals.
    ``floor``, ``step`` and ``relax`` are the hysteresis the store applies.
    """

    cpu: tuple[tuple[float, float], ...] = DEFAULT_LADDER
    memory: tuple[tuple[float, float], ...] = DEFAULT_LADDER
    busy: tuple[tuple[float, float], ...] = ()
    signals: tuple[tuple[float, float], ...] = DEFAULT_SIGNAL_LADDER
    floor: float = 0.1
    step: float = 0.25
    relax: float = 5.0

    def target(self, samples: Iterable[Sample]) -> float:
        """The factor the hottest live worker calls for, signal by signal; 1.0 without
        samples."""
        found = list(samples)
        if not found:
            return 1.0
        factor = min(
            _rung(self.cpu, max(s.cpu for s in found)),
            _rung(self.memory, max(s.memory for s in found)),
            _rung(self.busy, max(s.busy for s in found)),
        )
        names = {name for s in found for name in s.signals}
        for name in names:
            hottest = max(s.signals.get(name, 0.0) for s in found)
            factor = min(factor, _rung(self.signals, hottest))
        return factor

    @classmethod
    def from_settings(cls, value: Mapping[str, Any], where: str) -> LoadPolicy:
        """A policy from a settings dict (``cpu``, ``memory``, ``busy``, ``signal_thresholds``,
        ``floor``, ``step``, ``relax``); errors name ``where`` and the field."""
        kwargs: dict[str, Any] = {}
        for key, attr, scale in (
            ("cpu", "cpu", 100.0),
            ("memory", "memory", 100.0),
            ("busy", "busy", 1.0),
            ("signal_thresholds", "signals", 1.0),
        ):
            if key in value:
                kwargs[attr] = _ladder(value[key], f"{where}.{key}", scale)
        for key, least in (("floor", MIN_FACTOR), ("step", 0.0)):
            if key in value:
                kwargs[key] = _fraction(value[key], f"{where}.{key}", least)
        if "relax" in value:
            relax = value["relax"]
            if not _number(relax) or not 0 <= relax <= MAX_SPAN:
                raise ConfigurationError(
                    f"{where}.relax", f"got {relax!r}", f"seconds from 0 to {MAX_SPAN:g}"
                )
            kwargs["relax"] = float(relax)
        return cls(**kwargs)


def _rung(ladder: tuple[tuple[float, float], ...], value: float) -> float:
    for threshold, factor in ladder:
        if value > threshold:
            return factor
    return 1.0


def _ladder(value: object, where: str, scale: float) -> tuple[tuple[float, float], ...]:
    accepted = (
        f"a list of [threshold, factor] pairs, thresholds in [0, {scale:g}], factors in (0, 1], "
        "e.g. [[90, 0.25], [75, 0.5]]"
        if scale > 1
        else "a list of [threshold, factor] pairs in [0, 1] x (0, 1], e.g. [[0.9, 0.25]]"
    )
    if not isinstance(value, list | tuple):
        raise ConfigurationError(where, f"got {value!r}", accepted)
    rungs = []
    for pair in value:
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        if ok:
            threshold, factor = pair
            ok = _number(threshold) and 0 <= threshold <= scale and _number(factor)
            ok = ok and 0 < factor <= 1
        if not ok:
            raise ConfigurationError(where, f"bad pair {pair!r}", accepted)
        rungs.append((float(threshold), float(factor)))
    # Highest threshold first: the first one exceeded is the one that applies.
    return tuple(sorted(rungs, reverse=True))


def _fraction(value: object, where: str, least: float = 0.0) -> float:
    number = finite_number(value)
    if number is None or not 0 < number <= 1 or number < least:
        accepted = f"a number in [{least:g}, 1]" if least else "a number in (0, 1]"
        raise ConfigurationError(where, f"got {value!r}", accepted)
    return number


def _number(value: object) -> bool:
    return finite_number(value) is not None


def _percent(value: object) -> float:
    if not _number(value):
        raise ValueError("not a number")
    return min(max(float(value), 0.0), 100.0)  # type: ignore[arg-type]


def _unit(value: object) -> float:
    if not _number(value):
        raise ValueError("not a number")
    return min(max(float(value), 0.0), 1.0)  # type: ignore[arg-type]
