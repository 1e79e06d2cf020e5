# SPDX-License-Identifier: MIT
"""Contention: many processes and threads at once never admit more than the bucket holds.

The refill (1 unit a day) is far slower than the test, so timing cannot change the count: exactly
the burst is admitted, however the threads interleave.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import threading
from concurrent.futures import ThreadPoolExecutor

import redis

from tests.conftest import SECRET
from tests.redis_servers import RedisServer
from throttle import Keyspace, Limit, MemoryStore, RedisStore
from throttle.store.base import BaseStore

PROCESSES = 4
THREADS = 8
TRIES = 25  # per thread: 4 x 8 x 25 = 800 attempts
KEY_LIMIT = Limit("key", "1/d", burst=50)
AGENT_LIMIT = Limit("agent", "1/d", burst=10, per=["api_key", "agent_id"])


def _hammer(store: BaseStore, limits: list[Limit], agents: int, barrier: threading.Barrier) -> int:
    admitted = 0
    for i in range(TRIES):
        if i == 0:
            barrier.wait()  # every thread starts together
        identity = {"api_key": "shared", "agent_id": f"a{i % agents}"}
        admitted += store.admit(limits, identity).allowed
    return admitted


def _process(
    url: str,
    two_dimensions: bool,
    start: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[int],
) -> None:
    store = RedisStore(redis.Redis.from_url(url), Keyspace(SECRET))
    limits = [KEY_LIMIT, AGENT_LIMIT] if two_dimensions else [KEY_LIMIT]
    store.admit(limits, {"api_key": "warm-up"}, cost=0)  # connect and load before the start
    barrier = threading.Barrier(THREADS)
    start.wait()  # all processes are up: they contend from here on
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(_hammer, store, limits, 4, barrier) for _ in range(THREADS)]
        results.put(sum(f.result() for f in futures))


def _run_processes(url: str, two_dimensions: bool) -> int:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results: multiprocessing.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_process, args=(url, two_dimensions, start, results))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return total


def _remaining(store: BaseStore, limit: Limit) -> float:
    return store.admit([limit], {"api_key": "shared"}, cost=0).limits[0].remaining


def test_processes_and_threads_admit_exactly_the_burst(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """4 processes x 8 threads against one bucket of 50: exactly 50 admitted."""
    assert _run_processes(redis_server.url, two_dimensions=False) == 50
    store = RedisStore(redis_client, Keyspace(SECRET))
    assert _remaining(store, KEY_LIMIT) < 1


def test_two_dimensions_agent_binds_first(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """With 4 agents of 10 under a key of 50, exactly 40 pass and the key keeps exactly 10:
    denied admissions charged nothing."""
    assert _run_processes(redis_server.url, two_dimensions=True) == 40
    store = RedisStore(redis_client, Keyspace(SECRET))
    assert 10 <= _remaining(store, KEY_LIMIT) < 11


def test_memory_store_threads_admit_exactly_the_burst() -> None:
    """32 threads against the in-process store: exactly the burst, for one and two limits."""
    for limits, expected in (([KEY_LIMIT], 50), ([KEY_LIMIT, AGENT_LIMIT], 40)):
        store = MemoryStore(Keyspace(SECRET))
        barrier = threading.Barrier(PROCESSES * THREADS)
        with ThreadPoolExecutor(PROCESSES * THREADS) as pool:
            futures = [
                pool.submit(_hammer, store, limits, 4, barrier) for _ in range(PROCESSES * THREADS)
            ]
            assert sum(f.result() for f in futures) == expected
