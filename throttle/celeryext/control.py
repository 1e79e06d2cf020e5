# SPDX-License-Identifier: MIT
"""Remote control commands of the worker (registered when ``throttle`` is imported):

- ``celery -A app control throttle_factor 0.5``: set the load factor cluster-wide until
  ``celery -A app control throttle_factor clear``. Every worker that gets the broadcast sets
  the same value in the store, so any one of them answering is enough.
- ``celery -A app inspect throttle_status``: each worker's latest load sample, the samples of
  the live workers it last read, and the load factor in force (computed and override).
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from throttle.celeryext.report import factor_fields, parse_override, sample_fields
from throttle.errors import ConfigurationError, ThrottleError

__all__ = ["throttle_factor", "throttle_status"]


def _extension(state: Any) -> Any:
    from throttle.celeryext.worker import extension  # the worker module imports this one

    return extension(state.consumer.app)


@control_command(args=[("value", str)], signature="<factor in (0, 1]> | clear")  # type: ignore[untyped-decorator]
def throttle_factor(state: Any, value: str = "") -> dict[str, Any]:
    """Set (or clear) the cluster-wide load factor."""
    try:
        factor = parse_override(value)
    except ConfigurationError:
        return {"error": f"throttle_factor takes a number in (0, 1] or 'clear', got {value!r}"}
    try:
        result = _extension(state).store().override_load_factor(factor)
    except ThrottleError as exc:
        return {"error": f"the store did not take it: {exc}"}
    return {"ok": factor_fields(result)}


@inspect_command()  # type: ignore[untyped-decorator]
def throttle_status(state: Any) -> dict[str, Any]:
    """This worker's load sample, the live workers' samples and the factor in force."""
    ext = _extension(state)
    sampler = ext.sampler
    status: dict[str, Any] = {"adaptive": ext.settings.adaptive.enabled}
    if sampler is not None:
        status["sample"] = None if sampler.last is None else sample_fields(sampler.last)
        status["workers"] = [sample_fields(s) for s in sampler.cluster]
    try:
        status["factor"] = factor_fields(ext.store().load_factor())
    except ThrottleError as exc:
        status["factor"] = {"error": str(exc)}
    return status
