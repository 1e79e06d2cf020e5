# SPDX-License-Identifier: MIT
"""throttle: distributed, multi-dimension rate limiting for Celery tasks that call LLM APIs.

The admission core (limits, identities, stores) is usable without Celery; ``Throttle(app)``
installs the Celery gate.
"""

from throttle.adaptive import UpstreamThrottled
from throttle.celeryext import Throttle, ThrottleExhausted, limit, report_upstream, report_usage
from throttle.clock import Clock, SystemClock
from throttle.errors import (
    ConfigurationError,
    CostError,
    IdentityError,
    StoreError,
    StoreUnavailable,
    ThrottleError,
)
from throttle.identity import Bucket, Keyspace
from throttle.limits import Limit, Rate
from throttle.store import (
    Decision,
    LimitState,
    MemoryStore,
    Outcome,
    Receipt,
    RedisStore,
    Store,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "Bucket",
    "Clock",
    "ConfigurationError",
    "CostError",
    "Decision",
    "IdentityError",
    "Keyspace",
    "Limit",
    "LimitState",
    "MemoryStore",
    "Outcome",
    "Rate",
    "Receipt",
    "RedisStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "SystemClock",
    "Throttle",
    "ThrottleError",
    "ThrottleExhausted",
    "UpstreamThrottled",
    "__version__",
    "limit",
    "report_upstream",
    "report_usage",
]
