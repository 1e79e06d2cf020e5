# SPDX-License-Identifier: MIT
"""The one exception hierarchy of ``throttle``.

::

    ThrottleError
     ├── ConfigurationError (ValueError)   a limit, rate, setting or argument is malformed
     ├── IdentityError (ValueError)        an identity value or booking id of the wrong kind
     ├── CostError (ValueError)            a cost or usage report is not a finite number >= 0,
     │                                     or is larger than the limit can ever admit
     ├── StoreError                        the store could not give a decision
     │    └── StoreUnavailable             the store did not answer (connection, timeout)
     └── RetryBudgetExhausted              (throttle.client, which needs httpx) a rate-limited
                                           API still refused when the retries ran out

Every error carries the data a caller needs to act on it (the field, the limit, the value) as
attributes, and names it in its message. Causes are chained with ``raise ... from exc``. The
constructor arguments are the exception's ``args``, so an error stored as a task's result by a
Celery result backend comes back as the same class with the same message.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "CostError",
    "IdentityError",
    "StoreError",
    "StoreUnavailable",
    "ThrottleError",
]


class ThrottleError(Exception):
    """Base class of every error raised by ``throttle``."""


class ConfigurationError(ThrottleError, ValueError):
    """A limit, rate, setting or argument is malformed.

    ``field`` names what was wrong (``"rate"``, ``"throttle_limits['llm'].burst"``) and
    ``accepted`` says what would have been accepted.
    """

    def __init__(self, field: str, problem: str = "", accepted: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.accepted = accepted
        super().__init__(field, problem, accepted)

    def __str__(self) -> str:
        message = f"{self.field}: {self.problem}" if self.problem else self.field
        if self.accepted:
            message += f" (accepted: {self.accepted})"
        return message


class CostError(ThrottleError, ValueError):
    """A cost or a usage report that no limit can take: not numeric, NaN, infinite, negative,
    or larger than the burst of the limit it is charged to."""

    def __init__(self, limit: str, cost: object = None, problem: str = "") -> None:
        self.limit = limit
        self.cost = cost
        self.problem = problem
        super().__init__(limit, cost, problem)

    def __str__(self) -> str:
        return f"cost for limit {self.limit!r}: {self.problem} (got {self.cost!r})"


class IdentityError(ThrottleError, ValueError):
    """An identity value that cannot be fingerprinted, or a booking id no store could have
    issued. ``dimension`` names the part that was wrong; the value itself is never echoed, as
    it may be a secret."""

    def __init__(self, dimension: str, problem: str = "") -> None:
        self.dimension = dimension
        self.problem = problem
        super().__init__(dimension, problem)

    def __str__(self) -> str:
        return f"identity {self.dimension}: {self.problem}"


class StoreError(ThrottleError):
    """The store could not produce a decision (an unexpected reply or script error)."""


class StoreUnavailable(StoreError):
    """The store did not answer: connection refused or lost, or a timeout.

    The admission may or may not have been applied when the reply was lost; callers decide
    what to do by their ``on_store_error`` policy, never by retrying blindly.
    """
