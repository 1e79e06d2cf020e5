# SPDX-License-Identifier: MIT
"""Helpers for tests, ours and our users': a clock that moves only when told to."""

from __future__ import annotations

import threading

__all__ = ["ManualClock"]


class ManualClock:
    """A :class:`throttle.clock.Clock` that stands still until :meth:`advance` moves it."""

    def __init__(self, start_us: int = 1_000_000_000_000) -> None:
        self._now = start_us
        self._lock = threading.Lock()

    def now_us(self) -> int:
        return self._now

    def advance(self, seconds: float = 0.0, *, us: int = 0) -> int:
        """Move forward by ``seconds`` plus ``us`` microseconds; return the new time."""
        if seconds < 0 or us < 0:
            raise ValueError("a monotonic clock cannot go back")
        with self._lock:
            self._now += round(seconds * 1_000_000) + us
            return self._now
