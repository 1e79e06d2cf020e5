# SPDX-License-Identifier: MIT
"""``report_usage()``: what a task really used, to settle the estimate it was admitted with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from celery import current_task

from throttle.adaptive.upstream import Feedback, parse_headers
from throttle.celeryext import headers as H
from throttle.errors import CostError, ThrottleError
from throttle.limits import MAX_UNITS, finite_number

__all__ = ["report_upstream", "report_usage"]


def report_upstream(headers: Mapping[str, Any] | Iterable[tuple[Any, Any]]) -> Feedback:
    """Report the rate-limit headers of the provider's answer to the running task's call
    (``response.headers``), when it was not a 429 (those the gate sees for itself).

    Each of the task's limits with an ``upstream`` kind that the headers give a remaining
    count for follows it down, for every worker: when the provider says fewer remain than our
    bucket holds, the bucket comes down to that. Returns what the headers said. Never raises
    for what the provider sent, nor when the store cannot be reached (that is logged).
    """
    task = _running_task("report_upstream")
    from throttle.celeryext.worker import extension, throttle_headers

    feedback = parse_headers(headers)
    request = task.request
    extension(task.app).gate.follow(
        task,
        request.id,
        tuple(request.args or ()),
        dict(request.kwargs or {}),
        throttle_headers(request),
        feedback,
    )
    return feedback


def report_usage(usage: Mapping[str, float]) -> None:
    """Report units used by the running task, per limit name (``{"llm-tokens": 812}``).

    Call it from inside a throttled task, once or several times (reports add up). When the task
    ends, successfully or not, the total replaces the estimate it was admitted with: the
    difference is refunded or charged (see :meth:`throttle.store.BaseStore.settle`). A limit
    the task is not throttled by, or a value that is not a finite number >= 0 (or that adds up
    past what any bucket counts), is a :class:`CostError` naming the limit; nothing of that
    report is kept.
    """
    task = _running_task("report_usage")
    if not isinstance(usage, Mapping):
        raise CostError("usage", usage, "report_usage() takes a mapping of limit name to units")
    from throttle.celeryext.worker import extension

    spec = extension(task.app).gate.spec_for(task)
    names = spec.names if spec is not None else ()
    total = dict(getattr(task.request, H.USAGE, None) or {})
    for name, value in usage.items():
        if name not in names:
            limits = ", ".join(names) or "none"
            raise CostError(
                str(name), value, f"the task is not throttled by it (it is by: {limits})"
            )
        number = finite_number(value)
        if number is None or number < 0:
            raise CostError(str(name), value, "usage must be a finite number >= 0")
        total[name] = total.get(name, 0.0) + number
        if total[name] > MAX_UNITS:
            raise CostError(str(name), value, f"usage adds up to more than {MAX_UNITS:g} units")
    setattr(task.request, H.USAGE, total)


def _running_task(caller: str) -> Any:
    task = current_task._get_current_object()  # None outside a task (the proxy is never None)
    if task is None or task.request is None or task.request.id is None:
        raise ThrottleError(f"{caller}() must be called from inside a running task")
    return task
