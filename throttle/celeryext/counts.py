# SPDX-License-Identifier: MIT
"""Per-key traffic counts: what the gate admitted and deferred, for ``celery throttle``.

The gate counts in memory (a dict update per decision, no Redis call on the admission path)
and adds its counts to the store's per-minute tallies once per heartbeat. A tally is a hash per
minute of the Redis clock, kept ``throttle_counts_retention`` seconds, with fields:

- ``<key>|a``: tasks admitted; ``<key>|d``: deferrals (a task deferred twice counts twice),
  and ``<key>|d|<limit>``: those ``limit`` decided;
- ``<key>|t|<tier>``: tasks admitted in ``tier`` (so tools know a key's tier);
- ``<key>|u|<limit>``: units charged to ``limit`` at admission (estimates, before settlement);
- ``<key>|s|<limit>``: admissions the shadow limit ``limit`` would have deferred.

``<key>`` is the API key's fingerprint (``-`` for work without one), never the key itself.
When one process sees more than ``max_keys`` keys between two flushes, the rest are counted
under ``~other``, so memory and the flush stay bounded whatever the number of tenants.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from throttle.errors import ThrottleError
from throttle.store.base import BaseStore

__all__ = ["KeyTraffic", "Suggestion", "Tally", "deferral_fields", "suggest", "traffic"]

logger = logging.getLogger("throttle")

ANONYMOUS: Final = "-"
OTHER: Final = "~other"


class Tally:
    """One process's counts since its last flush (thread-safe)."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._counts: dict[str, float] = {}
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        # A pool child forked while the flush thread held the lock must not inherit it held;
        # nor the parent's counts, which the parent flushes.
        method = weakref.WeakMethod(self._after_fork)
        os.register_at_fork(after_in_child=lambda: (m := method()) and m())

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._counts = {}
        self._keys = set()

    def _key(self, key: str | None) -> str:
        key = key or ANONYMOUS
        if key not in self._keys:
            if len(self._keys) >= self.max_keys:
                return OTHER
            self._keys.add(key)
        return key

    def _add(self, name: str, amount: float = 1.0) -> None:
        self._counts[name] = self._counts.get(name, 0.0) + amount

    def admitted(self, key: str | None, costs: Mapping[str, float], tier: str) -> None:
        with self._lock:
            key = self._key(key)
            self._add(f"{key}|a")
            self._add(f"{key}|t|{tier}")
            for limit, cost in costs.items():
                self._add(f"{key}|u|{limit}", cost)

    def deferred(self, key: str | None, limit: str | None) -> None:
        with self._lock:
            for name in deferral_fields(self._key(key), limit):
                self._add(name)

    def shadow_denied(self, key: str | None, limit: str) -> None:
        with self._lock:
            self._add(f"{self._key(key)}|s|{limit}")

    def take(self) -> dict[str, float]:
        """The counts so far; the tally starts again from zero."""
        with self._lock:
            counts, self._counts = self._counts, {}
            self._keys = set()
        return counts

    def give_back(self, counts: Mapping[str, float]) -> None:
        """Counts that could not be stored: kept for the next flush."""
        with self._lock:
            for name, amount in counts.items():
                self._add(name, amount)
                self._keys.add(name.split("|", 1)[0])

    def flush(self, store: BaseStore, retention: float) -> None:
        """Add the counts to the store's tally of the current minute (kept on failure)."""
        counts = self.take()
        if not counts:
            return
        try:
            store.add_counts(counts, retention=retention)
        except ThrottleError as exc:
            logger.debug("traffic counts not stored (kept for the next flush): %s", exc)
            self.give_back(counts)
        except Exception:  # a thread of its own: log it, keep the counts
            logger.warning("traffic counts not stored (kept for the next flush)", exc_info=True)
            self.give_back(counts)


def deferral_fields(key: str | None, limit: str | None) -> list[str]:
    """The count fields one deferral of ``key``'s work by ``limit`` adds one to."""
    key = key or ANONYMOUS
    return [f"{key}|d", f"{key}|d|{limit}"] if limit else [f"{key}|d"]


@dataclass
class KeyTraffic:
    """One key's counts over a span of minutes (each list holds one value per minute)."""

    key: str
    admitted: list[float]
    deferred: list[float]
    units: dict[str, list[float]] = field(default_factory=dict)
    shadow: dict[str, float] = field(default_factory=dict)
    tiers: dict[str, float] = field(default_factory=dict)
    #: Deferrals per limit that decided them, over the span.
    deferred_by: dict[str, float] = field(default_factory=dict)

    @property
    def tier(self) -> str | None:
        """The tier most of this key's work was admitted in."""
        return max(self.tiers, key=lambda t: (self.tiers[t], t)) if self.tiers else None

    @property
    def deferred_share(self) -> float:
        """Deferrals per decision over the span (0 when there were none)."""
        return self.share_of(sum(self.deferred))

    def share_of(self, deferrals: float) -> float:
        """``deferrals`` per decision of this key over the span."""
        decisions = sum(self.admitted) + sum(self.deferred)
        return deferrals / decisions if decisions else 0.0


def traffic(minutes: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, KeyTraffic]:
    """Every key's traffic from the store's tallies (as :meth:`BaseStore.counts` returns them)."""
    n = len(minutes)
    out: dict[str, KeyTraffic] = {}
    for i, (_, fields) in enumerate(minutes):
        for name, amount in fields.items():
            key, _, rest = name.partition("|")
            kind, _, limit = rest.partition("|")
            found = out.get(key)
            if found is None:
                found = out[key] = KeyTraffic(key, [0.0] * n, [0.0] * n)
            if kind == "a":
                found.admitted[i] += amount
            elif kind == "d" and limit:
                found.deferred_by[limit] = found.deferred_by.get(limit, 0.0) + amount
            elif kind == "d":
                found.deferred[i] += amount
            elif kind == "u" and limit:
                found.units.setdefault(limit, [0.0] * n)[i] += amount
            elif kind == "s" and limit:
                found.shadow[limit] = found.shadow.get(limit, 0.0) + amount
            elif kind == "t" and limit:
                found.tiers[limit] = found.tiers.get(limit, 0.0) + amount
    return out


@dataclass(frozen=True)
class Suggestion:
    """What the counts say about one key under one limit."""

    key: str
    limit: str
    #: The limit's configured rate, in units per minute.
    configured: float
    #: The busiest minute of the span, in units.
    peak: float
    #: A limit with room for the peak: 2.5 x the peak per minute, rounded up to a round number
    #: (None when the key used nothing).
    proposed: float | None
    #: Deferrals this limit decided, per decision of this key over the span.
    deferred_share: float
    #: This limit deferred more than half of the key's work: it may be too tight (the peak is
    #: then the limit, not the demand).
    too_tight: bool
    #: Admissions this shadow limit would have deferred (0 for an enforced limit).
    would_deny: float


def suggest(
    found: Mapping[str, KeyTraffic],
    rates: Mapping[str, float],
    shadow: Sequence[str] = (),
    *,
    headroom: float = 2.5,
    tight: float = 0.5,
) -> list[Suggestion]:
    """A suggestion per key and limit (``rates``: limit name -> configured units per minute),
    the busiest keys first."""
    out = []
    for key, t in found.items():
        for limit, per_minute in rates.items():
            series = t.units.get(limit)
            peak = max(series) if series else 0.0
            share = t.share_of(t.deferred_by.get(limit, 0.0))
            out.append(
                Suggestion(
                    key=key,
                    limit=limit,
                    configured=per_minute,
                    peak=peak,
                    proposed=_round_up(peak * headroom) if peak > 0 else None,
                    deferred_share=share,
                    too_tight=share > tight,
                    would_deny=t.shadow.get(limit, 0.0) if limit in shadow else 0.0,
                )
            )
    out.sort(key=lambda s: (-s.peak, s.key, s.limit))
    return out


def _round_up(value: float) -> float:
    """``value`` rounded up to 1, 2 or 5 times a power of ten (at least 1)."""
    if value <= 1:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power * (1 + 1e-12):
            return float(step * power)
    return 10 * power  # pragma: no cover - the loop always returns
