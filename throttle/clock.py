# SPDX-License-Identifier: MIT
"""The one source of Python-side time.

Everything in ``throttle`` that needs the time on the Python side asks a :class:`Clock`, so tests
can replace it with :class:`throttle.testing.ManualClock` and assert exact waits. The Redis store
does not use it for decisions: admissions run on the Redis server's clock (``TIME``), which is the
only clock all workers share.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Monotonic time in integer microseconds. Only differences between readings mean anything."""

    def now_us(self) -> int: ...


class SystemClock:
    """The process's monotonic clock: immune to wall-clock steps (NTP, DST, manual changes)."""

    __slots__ = ()

    def now_us(self) -> int:
        return time.monotonic_ns() // 1000
