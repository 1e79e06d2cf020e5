# SPDX-License-Identifier: MIT
"""The Celery app that ``celery worker`` subprocesses of the suite run (``-A tests.workerapp``).

Configured from the environment by the test that starts the workers:
``THROTTLE_TEST_BROKER``, ``THROTTLE_TEST_BACKEND``, ``THROTTLE_TEST_STORE`` (URLs) and
``THROTTLE_TEST_CONF`` (JSON merged into ``app.conf``). Tasks record what happened in the store's
Redis under ``THROTTLE_TEST_PREFIX`` so the test can check it after the fact.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import throttle
from throttle import signals

PREFIX = os.environ.get("THROTTLE_TEST_PREFIX", "t")

if os.environ.get("THROTTLE_TEST_CLOCK_SKEW"):
    # This worker's wall clock (time.time, datetime.now: what Celery's ETAs go by) runs this
    # many seconds off the host's, as a machine with a wrong clock would.
    import time_machine

    _skew = float(os.environ["THROTTLE_TEST_CLOCK_SKEW"])
    time_machine.travel(time.time() + _skew, tick=True).start()

app = Celery(
    "workerapp",
    broker=os.environ.get("THROTTLE_TEST_BROKER", "redis://127.0.0.1:6379/1"),
    backend=os.environ.get("THROTTLE_TEST_BACKEND", "redis://127.0.0.1:6379/2"),
)
app.conf.update(
    throttle_redis_url=os.environ.get("THROTTLE_TEST_STORE", "redis://127.0.0.1:6379/0"),
    throttle_key_secret="suite-secret-for-worker-processes",
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
app.conf.update(json.loads(os.environ.get("THROTTLE_TEST_CONF", "{}")))
throttle.Throttle(app)

_record: redis.Redis | None = None


def recorder() -> redis.Redis:
    """A client of the Redis the record goes to (``THROTTLE_TEST_RECORD``, else the store's),
    opened after fork."""
    global _record
    if _record is None:
        _record = redis.Redis.from_url(
            os.environ.get("THROTTLE_TEST_RECORD") or app.conf.throttle_redis_url
        )
    return _record


@signals.task_throttled.connect
def _count_deferrals(sender: Any = None, **fields: Any) -> None:
    """Keep every deferral, so tests can count re-denials of work that came back booked."""
    fields.pop("signal", None)
    pipe = recorder().pipeline(transaction=False)
    pipe.rpush(f"{PREFIX}:deferrals", json.dumps(fields, sort_keys=True))
    pipe.rpush(f"{PREFIX}:deferred:{fields['reason']}", fields["task_id"])
    pipe.execute()


#: Records one run in one round trip: the entry, stamped with the record server's clock (one
#: clock for every worker) as "t", and the entry a test blocks on (BLPOP) to wait for runs.
_RECORD_RUN = """
local now = redis.call('TIME')
local t = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
redis.call('RPUSH', KEYS[1], string.sub(ARGV[1], 1, -2) .. ', "t": ' .. t .. '}')
redis.call('RPUSH', KEYS[2], ARGV[2])
"""
_record_run: Any = None


def _start(self: Any, i: int, label: str) -> None:
    global _record_run
    if _record_run is None:
        _record_run = recorder().register_script(_RECORD_RUN)
    entry = {
        "i": i,
        "id": self.request.id,
        "pid": os.getpid(),
        "retries": self.request.retries,
        "label": label,
        "booked": bool(getattr(self.request, "throttle_booking", None)),
        # When it was admitted, on the shared store's clock: as the store decided, or, for an
        # in-process admission while the store was away, as this worker reads that clock.
        "at": (getattr(self.request, "throttle_admitted", None) or {}).get("at"),
        # Whether the worker's in-process buckets admitted it (the store away, local mode).
        "local": bool((getattr(self.request, "throttle_admitted", None) or {}).get("local")),
        # Which copy of the task this is (None: never deferred), and whether the broker
        # delivered this message before (to a worker that died holding it).
        "token": getattr(self.request, "throttle_token", None),
        "redelivered": bool(
            (self.request.delivery_info or {}).get("redelivered")  # RabbitMQ
            or getattr(self.request, "redelivered", None)  # kombu's Redis restore
        ),
    }
    _record_run(keys=[f"{PREFIX}:starts", f"{PREFIX}:started"], args=[json.dumps(entry), i])


@app.task(bind=True, throttle=["per-key", "per-agent"], name="workerapp.record")
def record(self: Any, i: int, *, api_key: str, agent_id: str = "a", label: str = "") -> int:
    _start(self, i, label or agent_id)
    return i


@app.task(bind=True, throttle=["per-key"], acks_late=True, name="workerapp.record_late")
def record_late(self: Any, i: int, *, api_key: str) -> int:
    _start(self, i, "late")
    return i


# -- crash injection: a worker started with THROTTLE_TEST_CRASH dies at that point of its first
# deferral, as a SIGKILL would leave it (no cleanup, nothing acknowledged) -----------------------

_CRASH = os.environ.get("THROTTLE_TEST_CRASH", "")


def _die() -> None:
    import psutil

    me = psutil.Process()
    for child in me.children(recursive=True):
        child.kill()
    me.kill()


if _CRASH == "after-publish":
    from celery.signals import after_task_publish

    @after_task_publish.connect
    def _crash_after_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers and headers.get("throttle_token"):
            _die()

elif _CRASH == "after-guard":
    from throttle.store.base import BaseStore

    _set_guard = BaseStore.set_guard

    def _set_guard_then_die(self: Any, *args: Any, **kwargs: Any) -> None:
        _set_guard(self, *args, **kwargs)
        _die()

    BaseStore.set_guard = _set_guard_then_die  # type: ignore[method-assign]
