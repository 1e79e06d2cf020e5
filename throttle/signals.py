# SPDX-License-Identifier: MIT
"""Signals ``throttle`` sends (Celery's dispatcher: connect a receiver with ``.connect``).

``task_throttled``
    Sent in the process that deferred a task, once per deferral. Arguments: ``sender`` (the
    task), ``task_id``, ``limit`` (the limit that bound), ``key`` (the API key's fingerprint),
    ``retry_after`` (seconds), ``countdown`` (seconds until the next copy is delivered),
    ``deferrals`` (how many times this task was deferred, this one included), ``reason``
    (``booked``, ``early``, ``horizon``, ``denied``, ``store-closed``, ``local``) and
    ``rebooked`` (the task came back holding a booking and was deferred again).
``shadow_denied``
    A limit in ``mode: shadow`` would have deferred a task. Arguments: ``task_id``, ``limit``,
    ``retry_after``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["shadow_denied", "task_throttled"]

task_throttled = Signal(name="throttle.task_throttled")
shadow_denied = Signal(name="throttle.shadow_denied")
