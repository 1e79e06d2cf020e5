# SPDX-License-Identifier: MIT
"""Stores: where bucket state lives and where admissions are decided.

- :class:`RedisStore`: shared by every process and machine; decisions on the Redis clock.
- :class:`MemoryStore`: the same semantics in one process (eager mode, users' unit tests).
"""

from throttle.store.base import (
    BaseStore,
    Charge,
    Decision,
    Guard,
    LimitState,
    Outcome,
    Receipt,
    Store,
)
from throttle.store.memory import MemoryStore
from throttle.store.redis import RedisStore

__all__ = [
    "BaseStore",
    "Charge",
    "Decision",
    "Guard",
    "LimitState",
    "MemoryStore",
    "Outcome",
    "Receipt",
    "RedisStore",
    "Store",
]
