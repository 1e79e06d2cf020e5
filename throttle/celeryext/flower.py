# SPDX-License-Identifier: MIT
"""Flower configuration for ``throttle``: deferred tasks as a state of their own, with their fields.

::

    celery -A agents flower --conf="$(python -m throttle.celeryext.flower)"

``python -m throttle.celeryext.flower`` prints this file's path. Flower runs a ``--conf`` file
as Python inside its own process, so this file patches Flower's event state there; it sets no
Flower option itself, so ``FLOWER_*`` variables and command-line options (auth included) stay
in charge. With a configuration file of your own, call :func:`install` from it instead.

Each deferral sends a ``task-throttled`` event (``throttle.celeryext.worker._announce``), which
Celery's event state turns into the task state ``THROTTLED``. Out of the box Flower then:

* shows none of the event's fields (``celery.events.state.Task._fields`` is fixed), and
* keeps ``THROTTLED`` while the task is received again and started: Celery ranks an unknown
  state above RECEIVED and STARTED (``celery.states.PRECEDENCE``) and treats those later
  events as out of order (``celery.events.state.Task.event``), until SUCCESS or FAILURE.

:func:`install` gives Flower's state (``flower.events.EventsState.Task``) a task class whose
``_fields`` add ``limit``, ``key`` (the API key's fingerprint, never the key), ``retry_after``,
``countdown``, ``deferrals``, ``reason`` and ``rebooked``, and whose states run
THROTTLED -> RECEIVED -> STARTED -> SUCCESS. A deferred copy received while its booked slot is
still ahead (its ETA after the receipt: on a Redis broker the worker takes a countdown message
at once and holds it) leaves the task THROTTLED; it becomes RECEIVED when a copy arrives that
is due, STARTED when a copy starts, and REVOKED or REJECTED as those events say.

``Throttle(app)`` already shows an API key as ``<api_key FINGERPRINT>`` in the argument reprs
of the work it publishes; work published without it (a plain client's ``send_task``) carries
the raw value. So the value of an ``api_key`` item in the ``args``/``kwargs`` reprs of Celery's
events, unless it is such a fingerprint, is replaced by ``'[redacted]'`` before Flower stores,
indexes or shows it (an identity taken from an argument of another name, or from a positional
argument, is not recognised here).

The ``flower_worker_prefetched_tasks`` gauge counts a receipt without an ETA up and its start
(or revocation) down (``flower.events.PrometheusMetrics.observe_task``). A gate deferral ends
the copy without a start, and the copies that follow carry an ETA, which Flower does not
count; so the gauge kept one unit per deferred task for good. :func:`install` takes it down
on ``task-throttled`` when the copy's receipt was counted and not yet taken down.

Everything depends on Flower's and Celery's internals (checked against Flower 2.2 and
Celery 5.7): where they are not as expected, :func:`install` logs a warning and leaves that
part alone; Flower runs on unchanged.
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable
from datetime import datetime
from logging import getLogger
from pathlib import Path
from typing import Any, Final

from celery import states
from celery.events.state import Task as _CeleryTask

__all__ = ["THROTTLED", "THROTTLE_FIELDS", "ThrottledTask", "config_path", "install"]

# Never name a module-level global after a Flower or tornado option (``logging``, ``port``,
# ``debug``...): tornado reads every global of a --conf file as an option value.
_logger = getLogger("throttle.celeryext.flower")

#: The task state Celery's event state derives from ``task-throttled``.
THROTTLED: Final = "THROTTLED"
#: The fields of ``task-throttled`` events that Flower's task page and API show.
THROTTLE_FIELDS: Final = (
    "limit",
    "key",
    "retry_after",
    "countdown",
    "deferrals",
    "reason",
    "rebooked",
)
#: Events whose state replaces THROTTLED (failed, succeeded and retried do so anyway).
_LEAVE_THROTTLED: Final = frozenset({"received", "started", "revoked", "rejected"})
#: An ``api_key`` item in a repr of a task's arguments (its value maybe cut short).
_SECRET_ITEM = re.compile(
    r"""(?P<head>(?P<q>['"])api_key(?P=q)\s*:\s*)"""
    r"""(?P<value>[rbuRBU]{0,2}(?P<v>['"])(?:\\.|(?!(?P=v)).)*(?P=v)?|[^,})\]]*)"""
)
#: How ``Throttle(app)`` shows an API key in the reprs it writes.
_FINGERPRINT = re.compile(r"""(['"])<api_key [\w-]+>\1""")
_REDACTED = "'[redacted]'"
#: Per task in Flower's state: receipts Flower counted in the prefetched gauge, not yet down.
_PREFETCHED = "_throttle_prefetched"
_MARK = "__throttle_flower__"


def _with_throttle_fields(fields: tuple[str, ...]) -> tuple[str, ...]:
    """``fields`` with the throttle fields after ``state`` (so the task page shows them first)."""
    extra = tuple(f for f in THROTTLE_FIELDS if f not in fields)
    at = fields.index("state") + 1 if "state" in fields else len(fields)
    return fields[:at] + extra + fields[at:]


def _redact(text: Any) -> Any:
    """``text`` (a repr of a task's arguments) with each raw ``api_key`` value replaced."""
    if not isinstance(text, str) or "api_key" not in text:
        return text

    def hide(item: re.Match[str]) -> str:
        if _FINGERPRINT.fullmatch(item.group("value")):
            return item.group(0)
        return item.group("head") + _REDACTED

    return _SECRET_ITEM.sub(hide, text)


def _due(fields: dict[str, Any], timestamp: float | None) -> bool:
    """Whether a received copy is due: no ETA, or an ETA not after its receipt."""
    eta = fields.get("eta")
    if not eta:
        return True
    try:
        when = datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) else float(eta)
    except (TypeError, ValueError):
        return True
    return when <= (timestamp if timestamp is not None else time.time())


class ThrottledTask(_CeleryTask):  # type: ignore[misc]
    """A task in Flower's event state that knows about deferrals (see the module docstring)."""

    _fields = _with_throttle_fields(tuple(_CeleryTask._fields))
    # ``as_dict`` reads every field with object.__getattribute__: each needs a default.
    limit = key = retry_after = countdown = deferrals = reason = rebooked = None

    def event(
        self,
        type_: str,
        timestamp: float | None = None,
        local_received: float | None = None,
        fields: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if fields:
            for name in ("args", "kwargs"):
                if name in fields:
                    fields[name] = _redact(fields[name])
        if (
            getattr(self, "state", None) == THROTTLED
            and type_ in _LEAVE_THROTTLED
            and (type_ != "received" or _due(fields or {}, timestamp))
        ):
            # The deferral is over: the task starts its way through the states again, so this
            # event is applied as the newest (Celery would take it for an earlier one).
            self.state = states.PENDING
        super().event(type_, timestamp, local_received, fields, *args, **kwargs)


def _track_prefetched(metrics: Any, worker: str, event: dict[str, Any], task: Any) -> None:
    """Take ``flower_worker_prefetched_tasks`` down for a deferred copy whose receipt Flower
    counted. Keeps, per task, the receipts Flower counted up and not yet down, by the
    conditions of Flower 2.2's ``PrometheusMetrics.observe_task``, which has just run."""
    kind = event.get("type")
    counted = task.__dict__.get(_PREFETCHED, 0)
    if kind == "task-throttled":
        if counted:
            name = event.get("name") or task.name or ""
            metrics.number_of_prefetched_tasks.labels(worker, name).dec()
            task.__dict__[_PREFETCHED] = counted - 1
    elif task.eta or not task.received:
        return  # Flower counts nothing for such a task
    elif kind == "task-received":
        task.__dict__[_PREFETCHED] = counted + 1
    elif counted and (
        (kind == "task-started" and task.started)
        or (kind in ("task-revoked", "task-rejected") and not task.started)
    ):
        task.__dict__[_PREFETCHED] = counted - 1


def _observe_task(original: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``observe_task`` followed by :func:`_track_prefetched`."""
    warned = False

    def observe_task(self: Any, worker: str, event: dict[str, Any], task: Any) -> Any:
        nonlocal warned
        result = original(self, worker, event, task)
        try:
            _track_prefetched(self, worker, event, task)
        except Exception:  # Flower's metrics are not as expected: never break its event loop
            if not warned:
                warned = True
                _logger.warning(
                    "throttle: cannot adjust flower_worker_prefetched_tasks", exc_info=True
                )
        return result

    setattr(observe_task, _MARK, original)
    return observe_task


def install() -> bool:
    """Patch Flower in this process (idempotent). Return whether every part applied; a part
    that does not fit this Flower logs a warning and is skipped."""
    try:
        events = importlib.import_module("flower.events")
        from celery.events.state import State
    except ImportError as exc:
        _logger.warning("throttle: Flower is not importable here (%s): nothing patched", exc)
        return False
    ok = True

    state_cls = getattr(events, "EventsState", None)
    current = getattr(state_cls, "Task", None)
    if (
        not isinstance(state_cls, type)
        or not issubclass(state_cls, State)
        or not isinstance(_CeleryTask.__dict__.get("_fields"), tuple)
        or not callable(_CeleryTask.__dict__.get("event"))
        or not isinstance(current, type)
        or not issubclass(current, _CeleryTask)
    ):
        _logger.warning("throttle: Flower's event state is not as expected: fields not shown")
        ok = False
    elif current is not ThrottledTask:
        if current is not _CeleryTask:
            _logger.warning("throttle: Flower's event state already uses %r: left alone", current)
            ok = False
        else:
            state_cls.Task = ThrottledTask  # type: ignore[attr-defined]

    metrics_cls = getattr(events, "PrometheusMetrics", None)
    observe = getattr(metrics_cls, "observe_task", None)
    if not callable(observe):
        _logger.warning("throttle: Flower has no PrometheusMetrics.observe_task: gauge left")
        ok = False
    elif not hasattr(observe, _MARK):
        metrics_cls.observe_task = _observe_task(observe)  # type: ignore[union-attr]
    return ok


def config_path() -> Path:
    """The path to pass to ``flower --conf``."""
    return Path(__file__).resolve()


if __name__ == "__main__":
    print(config_path())
elif "__name__" not in globals():
    # Run by Flower as its --conf file (tornado.options.parse_config_file execs it without a
    # module name). Patch through the imported module, so Flower's persistent mode can pickle
    # the task class by its import path.
    from throttle.celeryext.flower import install as _install

    _install()
