# SPDX-License-Identifier: MIT
"""The Celery app that the ``celery worker`` processes of ``benchmarks/gate.py`` run
(``-A benchmarks.gateapp``).

Configured from the environment by the benchmark: ``GATE_BENCH_BROKER``, ``GATE_BENCH_BACKEND``,
``GATE_BENCH_STORE`` (URLs) and ``GATE_BENCH_CONF`` (JSON merged into ``app.conf``). Tasks and
the deferral signal record what happened in the store's Redis under ``GATE_BENCH_PREFIX``:

``<prefix>:starts``     one JSON entry per task start (id, i, wall time, worker)
``<prefix>:deferrals``  a hash of counters: ``deferrals``, ``rebooked``, ``reason:<reason>``

The ``bench_held`` inspect command counts what a worker holds in memory without running it:
``scheduled`` (countdown/ETA requests in its timer, exactly the entries ``celery inspect
scheduled`` lists) and ``bucket`` (requests waiting in Celery's own ``rate_limit`` buckets, which
``inspect scheduled`` does not show).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis
from celery import Celery
from celery.worker.control import inspect_command
from celery.worker.request import Request

import throttle
from throttle import signals

PREFIX = os.environ.get("GATE_BENCH_PREFIX", "bench")
#: Never binds: every call is admitted (the overhead measurement).
OPEN_LIMIT: dict[str, Any] = {"rate": "1000000/s", "burst": 1000000}

app = Celery(
    "gateapp",
    broker=os.environ.get("GATE_BENCH_BROKER", "redis://127.0.0.1:6379/1"),
    backend=os.environ.get("GATE_BENCH_BACKEND", "redis://127.0.0.1:6379/2"),
)
app.conf.update(
    throttle_redis_url=os.environ.get("GATE_BENCH_STORE", "redis://127.0.0.1:6379/0"),
    throttle_key_secret="benchmark-secret-for-worker-processes",
    throttle_limits={"open": OPEN_LIMIT, "bench": {"rate": "1/s", "burst": 10}},
    worker_prefetch_multiplier=4,
    # Static limits against Celery's static rate_limit: the machine's own load must not move
    # the limit under measurement (benchmarks/adaptive.py measures the adaptive part).
    throttle_adaptive={"enabled": False},
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
app.conf.update(json.loads(os.environ.get("GATE_BENCH_CONF", "{}")))
throttle.Throttle(app)

_record: redis.Redis | None = None
_NODE = f"{socket.gethostname()}:{os.getpid()}"


def recorder() -> redis.Redis:
    """A client of the store's Redis for the record (opened lazily, so after the fork)."""
    global _record
    if _record is None:
        _record = redis.Redis.from_url(app.conf.throttle_redis_url)
    return _record


@signals.task_throttled.connect
def _count_deferral(sender: Any = None, **fields: Any) -> None:
    """Count every deferral (sent in the worker process that deferred the task)."""
    key = f"{PREFIX}:deferrals"
    pipe = recorder().pipeline(transaction=False)
    pipe.hincrby(key, "deferrals", 1)
    pipe.hincrby(key, f"reason:{fields.get('reason')}", 1)
    if fields.get("rebooked"):
        pipe.hincrby(key, "rebooked", 1)
    pipe.execute()


def _started(task: Any, i: int) -> None:
    entry = {"i": i, "id": task.request.id, "t": time.time(), "node": task.request.hostname}
    recorder().rpush(f"{PREFIX}:starts", json.dumps(entry))


# -- the overhead measurement: the same no-op with and without the gate ------------------------


@app.task(name="gateapp.noop")
def noop(i: int, *, api_key: str) -> int:
    return i


@app.task(throttle="open", name="gateapp.noop_gated")
def noop_gated(i: int, *, api_key: str) -> int:
    return i


# -- the limit comparison and the backlog: tasks that record their start -----------------------


@app.task(bind=True, throttle="bench", name="gateapp.ours")
def ours(self: Any, i: int, *, api_key: str) -> int:
    _started(self, i)
    return i


@app.task(bind=True, rate_limit="60/m", name="gateapp.builtin")
def builtin(self: Any, i: int, *, api_key: str) -> int:
    _started(self, i)
    return i


@inspect_command()
def bench_held(state: Any, **_: Any) -> dict[str, int]:
    """How many requests this worker holds without running them (see the module docstring)."""
    consumer = state.consumer
    scheduled = 0
    for waiting in list(consumer.timer.schedule.queue):
        args = getattr(waiting.entry, "args", None)
        if args and isinstance(args[0], Request):
            scheduled += 1
    bucket = sum(len(b.contents) for b in consumer.task_buckets.values() if b is not None)
    return {"scheduled": scheduled, "bucket": bucket}
