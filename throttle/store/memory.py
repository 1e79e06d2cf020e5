# SPDX-License-Identifier: MIT
"""An in-process store with the Redis store's semantics and API.

For eager mode, single-process tools and users' own unit tests. State lives in this process
only: two processes with two MemoryStores do not share limits. Thread-safe (one lock around each
admission, as Redis runs one script at a time). Time comes from an injectable monotonic clock, so
tests can drive it with :class:`throttle.testing.ManualClock`.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from throttle.clock import Clock, SystemClock
from throttle.identity import Keyspace
from throttle.store._engine import Engine
from throttle.store.base import BaseStore

__all__ = ["MemoryStore"]

# Sweep expired keys after this many writes, so idle buckets do not pile up.
_SWEEP_EVERY = 4096


class MemoryStore(BaseStore):
    """Admissions against in-process state; see :class:`throttle.store.base.BaseStore`."""

    def __init__(
        self,
        keyspace: Keyspace,
        *,
        clock: Clock | None = None,
        booking_grace: float = 600.0,
    ) -> None:
        super().__init__(keyspace, booking_grace=booking_grace)
        self.clock: Clock = clock or SystemClock()
        self._engine = Engine()
        self._lock = threading.Lock()
        self._writes = 0

    def _now(self, arg: str) -> float:
        return float(arg) if arg else float(self.clock.now_us())

    def _run_admit(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        with self._lock:
            now = self._now(argv[0])
            self._maybe_sweep(now)
            return self._engine.admit(keys, argv, now)

    def _run_settle(self, keys: list[str], argv: list[str]) -> object:
        with self._lock:
            now = self._now(argv[0])
            self._maybe_sweep(now)
            return self._engine.settle(keys, argv, now)

    def _run_load(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        with self._lock:
            return self._engine.load(keys, argv, self._now(argv[0]))

    def _run_upstream(self, keys: list[str], argv: list[str]) -> object:
        with self._lock:
            return self._engine.upstream(keys, argv, self._now(argv[0]))

    def _run_sample(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        with self._lock:
            return self._engine.sample(keys, argv, self._now(argv[0]))

    def _delete(self, keys: list[str]) -> None:
        with self._lock:
            self._engine.delete(*keys)

    def _set_text(self, key: str, value: str, ttl: float) -> None:
        with self._lock:
            self._engine.set_text(key, value, max(1, round(ttl * 1000)), float(self.clock.now_us()))

    def _set_guard(self, key: str, token: str, after: str, ttl: float) -> bool:
        with self._lock:
            now = float(self.clock.now_us())
            live = self._engine.get_text(key, now)
            if (
                after
                and live is not None
                and live not in (after, token)
                and not live.startswith(after + "*")
            ):
                return False
            self._engine.set_text(key, token, max(1, round(ttl * 1000)), now)
            return True

    def _get_number(self, key: str) -> float | None:
        with self._lock:
            return self._engine.get(key, float(self.clock.now_us()))

    def _delete_counted(self, keys: list[str]) -> int:
        with self._lock:
            live = set(self._engine.live_keys(float(self.clock.now_us())))
            self._engine.delete(*keys)
        return len(live.intersection(keys))

    def _scan(self, match: str, most: int) -> tuple[list[str], bool]:
        found = [key for key in self.keys() if fnmatch.fnmatchcase(key, match)]
        return found[:most], len(found) <= most

    def _now_us(self) -> int:
        return self.clock.now_us()

    def _add_counts(self, key: str, counts: Mapping[str, float], ttl: float) -> None:
        with self._lock:
            now = float(self.clock.now_us())
            for name, amount in counts.items():
                self._engine.hincr(key, name, amount, now)
            self._engine.pexpire(key, round(ttl * 1000), now)

    def _read_counts(self, keys: list[str]) -> list[dict[str, float]]:
        with self._lock:
            now = float(self.clock.now_us())
            return [self._engine.hgetall(key, now) for key in keys]

    def _maybe_sweep(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._engine.live_keys(now)

    def keys(self) -> list[str]:
        """Every live key, as ``KEYS *`` would list them in Redis (for tests and inspection)."""
        with self._lock:
            return self._engine.live_keys(float(self.clock.now_us()))
