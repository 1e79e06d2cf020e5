# SPDX-License-Identifier: MIT
"""The Celery app that the ``celery worker`` processes of ``benchmarks/adaptive.py`` run
(``-A benchmarks.adaptiveapp``).

Configured from the environment: ``ADAPTIVE_BENCH_BROKER``, ``ADAPTIVE_BENCH_BACKEND``,
``ADAPTIVE_BENCH_STORE`` (URLs), ``ADAPTIVE_BENCH_PROVIDER`` (the simulated provider's URL) and
``ADAPTIVE_BENCH_CONF`` (JSON merged into ``app.conf``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from celery import Celery

import throttle

app = Celery(
    "adaptiveapp",
    broker=os.environ.get("ADAPTIVE_BENCH_BROKER", "redis://127.0.0.1:6379/1"),
    backend=os.environ.get("ADAPTIVE_BENCH_BACKEND", "redis://127.0.0.1:6379/2"),
)
app.conf.update(
    throttle_redis_url=os.environ.get("ADAPTIVE_BENCH_STORE", "redis://127.0.0.1:6379/0"),
    throttle_key_secret="benchmark-secret-for-worker-processes",
    throttle_limits={"llm": {"rate": "40/s", "burst": 40, "upstream": "requests"}},
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
)
app.conf.update(json.loads(os.environ.get("ADAPTIVE_BENCH_CONF", "{}")))
throttle.Throttle(app)

PROVIDER = os.environ.get("ADAPTIVE_BENCH_PROVIDER", "http://127.0.0.1:9/")
_client: httpx.Client | None = None


def client() -> httpx.Client:
    global _client
    if _client is None:  # one per pool process, after the fork
        _client = httpx.Client(timeout=10)
    return _client


@app.task(throttle=["llm"], name="adaptiveapp.feedback")
def feedback(i: int, *, api_key: str) -> int:
    """Calls the provider and lets a 429 through: throttle defers the task and adapts."""
    client().post(PROVIDER, headers={"x-api-key": api_key}, json={"i": i}).raise_for_status()
    return i


@app.task(bind=True, throttle=["llm"], name="adaptiveapp.static", max_retries=None)
def static(self: Any, i: int, *, api_key: str) -> int:
    """The same call behind the same static limit, retrying a 429 the usual Celery way."""
    answer = client().post(PROVIDER, headers={"x-api-key": api_key}, json={"i": i})
    if answer.status_code == 429:
        raise self.retry(countdown=float(answer.headers.get("retry-after", "1")))
    answer.raise_for_status()
    return i
