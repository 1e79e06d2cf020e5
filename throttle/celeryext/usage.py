# SPDX-License-Identifier: MIT
"""``report_usage()``: what a task really used, to settle the estimate it was admitted with."""

from __future__ import annotations

import math
from collections.abc import Mapping

from celery import current_task

from throttle.errors import CostError, ThrottleError

__all__ = ["report_usage"]


def report_usage(usage: Mapping[str, float]) -> None:
    """Report units used by the running task, per limit name (``{"llm-tokens": 812}``).

    Call it from inside a throttled task, once or several times (reports add up). When the task
    ends, successfully or not, the total replaces the estimate it was admitted with: the
    difference is refunded or charged (see :meth:`throttle.store.BaseStore.settle`).
    """
    task = current_task
    if task is None or task.request is None or task.request.id is None:
        raise ThrottleError("report_usage() must be called from inside a running task")
    if not isinstance(usage, Mapping):
        raise CostError("usage", usage, "report_usage() takes a mapping of limit name to units")
    for name, value in usage.items():
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise CostError(str(name), value, "usage must be a finite number >= 0")
    total = dict(getattr(task.request, "throttle_usage", None) or {})
    for name, value in usage.items():
        total[name] = total.get(name, 0.0) + float(value)
    task.request.throttle_usage = total
