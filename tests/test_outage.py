# SPDX-License-Identifier: MIT
"""The store (its own redis-server, apart from the broker) dies in the middle of a run and
comes back empty: for each ``on_store_error`` mode nothing is lost, nothing runs twice, the
mode's promise holds while it is down, and the shared buckets are back in force after.

The outage lasts until the test has seen what it waits for (results, or deferral signals);
nothing here sleeps to let time pass."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import throttle
from tests.conftest import TIMEOUT, make_app
from tests.redis_servers import RedisServer
from tests.test_workers import max_in_window
from throttle import RedisStore, StoreUnavailable, signals
from throttle.testing import ManualClock

pytestmark = pytest.mark.usefixtures("redis_client")  # broker and backend dbs emptied


@pytest.fixture
def store_server() -> Iterator[RedisServer]:
    """The throttle store on a server of its own, which the test kills and restarts."""
    with RedisServer() as server:
        yield server


def run(
    mode: str, server: RedisServer, store: RedisServer, start: Callable[..., Any]
) -> tuple[Any, list[dict[str, Any]]]:
    """An app whose one limit has ``mode`` as on_store_error, a task recording its runs, and a
    worker for it."""
    app = make_app(
        server,
        throttle_redis_url=store.url,
        throttle_limits={"req": {"rate": "5/s", "burst": 5, "on_store_error": mode}},
        throttle_store_retry=0.2,
    )
    app.conf.throttle_socket_timeout = 0.2
    throttle.Throttle(app)
    runs: list[dict[str, Any]] = []
    lock = threading.Lock()

    @app.task(bind=True, name=f"{app.main}.step", throttle="req")
    def step(self: Any, i: int, *, api_key: str) -> int:
        with lock:
            runs.append(
                {
                    "i": i,
                    "t": time.monotonic(),
                    "id": self.request.id,
                    "admitted": self.request.throttle_admitted,
                    "wall": time.time(),
                }
            )
        return i

    start(app)
    return step, runs


@pytest.mark.parametrize("mode", ["open", "local", "closed"])
def test_store_outage(
    mode: str,
    redis_server: RedisServer,
    store_server: RedisServer,
    worker: Callable[..., Any],
    request: pytest.FixtureRequest,
) -> None:
    """Before: shared buckets. Store killed: open runs everything, local holds the limit with
    an in-process bucket, closed defers everything. Store back (empty): shared buckets again;
    every task ran exactly once."""
    closed_deferrals = threading.Semaphore(0)

    def count(reason: str = "", **_: Any) -> None:
        if reason == "store-closed":
            closed_deferrals.release()

    signals.task_throttled.connect(count, weak=False)
    request.addfinalizer(lambda: signals.task_throttled.disconnect(count))
    step, runs = run(mode, redis_server, store_server, worker)
    before = [step.delay(i, api_key="k") for i in range(5)]
    assert [r.get(timeout=TIMEOUT) for r in before] == list(range(5))
    assert store_server.client().keys("throttle:*")  # the shared bucket was used

    store_server.kill()
    down_at = time.monotonic()
    during = [step.delay(i, api_key="k") for i in range(5, 25)]
    if mode in ("open", "local"):
        # Both let work through while the store is down: wait for all of it, then check how.
        assert [r.get(timeout=TIMEOUT) for r in during] == list(range(5, 25))
        times = [r["t"] for r in runs if r["i"] >= 5]
        if mode == "local":
            # One live worker: the whole limit, 5 at once then 5/s, in an in-process bucket.
            assert max_in_window(times, 1.0) <= 5 + 5
            assert max(times) - min(times) >= (20 - 5) / 5 - 0.5
            # The task sees it was admitted in process, and when, on the store's clock as the
            # worker reads it (this host's: the store runs here).
            for r in runs[5:]:
                assert r["admitted"]["local"] == 1
                assert abs(r["admitted"]["at"] - r["wall"]) < 0.5
        else:
            assert max(times) - down_at < 10  # nothing held them back
    else:
        # Closed: every task is deferred and checked again; none may start while it is down.
        # Wait until each of the 20 has been deferred twice (the worker's own signals).
        for _ in range(40):
            assert closed_deferrals.acquire(timeout=TIMEOUT)
        assert [r for r in runs if r["i"] >= 5] == []
    store_server.restart()  # empty: the data is gone
    results = [r.get(timeout=TIMEOUT) for r in during]
    assert results == list(range(5, 25))
    # Back to the shared buckets: tasks sent one by one after the restart are soon charged in
    # the store again (the gate retries Redis every throttle_store_retry).
    # The gate leaves Redis alone for throttle_store_retry (0.2 s) after a failure, and tasks
    # here take milliseconds: keep sending until one is charged in the store again.
    store = store_server.client()
    total = 25
    deadline = time.monotonic() + TIMEOUT
    while not store.keys("throttle:{*}:req"):
        assert time.monotonic() < deadline, "the shared bucket was not used again"
        assert step.delay(total, api_key="k").get(timeout=TIMEOUT) == total
        total += 1
    assert sorted(r["i"] for r in runs) == list(range(total))  # nothing lost, nothing twice
    assert len({r["id"] for r in runs}) == total


def test_a_sibling_whose_beat_comes_late_once_still_counts(redis_server: RedisServer) -> None:
    """While Redis answers, each worker counts the live ones by their heartbeats; while it is
    away, a local limit gives each worker its share by that count. A sibling whose beat came
    late once (its host was busy) still counts for two windows of beats (a window is three
    intervals): had the store gone away just then, every worker would have taken a larger
    share and together they would have admitted more than the limit."""
    clock = ManualClock()
    app = make_app(redis_server, throttle_heartbeat_interval=1)
    ext = throttle.Throttle(app, clock=clock)
    store = ext.store()
    assert isinstance(store, RedisStore)
    workers = redis_server.client()
    key = f"{ext.keyspace.prefix}:{{~workers}}"
    for sibling in ("b", "c"):
        store.heartbeat(sibling, 3)
    assert ext.heartbeat("a") == 3
    # The siblings' last beats are now past the window, as the store sees it.
    seconds, micros = workers.time()
    workers.zadd(key, {"b": 0, "c": 0})
    assert workers.zcount(key, seconds * 1_000_000 + micros - 3_000_000, "+inf") == 1
    clock.advance(1)
    assert ext.heartbeat("a") == 3
    clock.advance(4.5)  # 5.5 s after the count of 3: still within two windows (6 s)
    assert ext.heartbeat("a") == 3
    clock.advance(1)  # 6.5 s after it: the siblings are gone
    assert ext.heartbeat("a") == 1
    store.heartbeat("b", 3)  # one comes back
    assert ext.heartbeat("a") == 2


def test_the_count_before_an_outage_stands_until_the_workers_have_beaten_again(
    redis_server: RedisServer, store_server: RedisServer
) -> None:
    """A store restarted empty counts only the workers that have beaten into it since: the
    first beat after the outage would count one. The counts from before stand until beats have
    succeeded for two windows again (while the gate may still be using its local buckets)."""
    clock = ManualClock()
    app = make_app(redis_server, throttle_redis_url=store_server.url, throttle_heartbeat_interval=1)
    app.conf.throttle_socket_timeout = 0.2
    ext = throttle.Throttle(app, clock=clock)
    store = ext.store()
    assert isinstance(store, RedisStore)
    for sibling in ("b", "c"):
        store.heartbeat(sibling, 3)
    assert ext.heartbeat("a") == 3
    store_server.kill()
    clock.advance(1)
    with pytest.raises(StoreUnavailable):
        ext.heartbeat("a")
    clock.advance(20)
    store_server.restart()  # empty: nobody has beaten into it yet
    assert ext.heartbeat("a") == 3
    clock.advance(5.5)  # beats have succeeded for 5.5 s: less than two windows
    assert ext.heartbeat("a") == 3
    clock.advance(1)  # 6.5 s: the siblings have had two windows to beat, and did not
    assert ext.heartbeat("a") == 1
