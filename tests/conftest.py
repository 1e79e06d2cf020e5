# SPDX-License-Identifier: MIT
"""Shared fixtures: a private redis-server for the whole run, a Redis Cluster when asked for,
and the two stores every core test runs over."""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from celery import Celery
from celery.contrib.testing.worker import start_worker

from tests.redis_servers import RedisCluster, RedisServer
from throttle import Keyspace, MemoryStore, RedisStore
from throttle.store.base import BaseStore
from throttle.testing import ManualClock

SECRET = "test-secret-with-enough-bytes-0123456789"

#: A fixed point on the simulated clock (microseconds), so tests pass ``now_us`` explicitly and
#: never depend on the Redis server's clock. Large, like a real epoch time in microseconds.
T0 = 1_760_000_000_000_000
#: How long a test waits for a task result before it fails.
TIMEOUT = 60
_apps = itertools.count()


#: The tests that keep more than about one CPU busy while they run (measured on the 2-core
#: machine CI uses). ``make test`` runs the tests that start worker processes in two lanes at
#: once (``--lane busy`` and ``--lane light``): these one after another in one, the rest in
#: the other, so that no two of these share the machine.
BUSY_TESTS = frozenset(
    {
        "tests/test_load.py::test_twenty_thousand_tasks_from_a_thousand_agents",
        "tests/test_faults.py::test_store_down_twenty_seconds_under_each_mode",
        "tests/test_faults.py::test_script_flush_and_client_kill_in_the_middle_of_a_run",
        "tests/test_cluster_failover.py::test_master_killed_and_replica_promoted_during_a_run",
        "tests/test_workers.py::test_a_runaway_agent_does_not_starve_its_siblings",
        "tests/test_demo.py",  # one run of the demo, shared by the module's tests
    }
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lane",
        choices=("busy", "light"),
        help="run only the tests of this lane (busy: those in BUSY_TESTS; light: the others)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lane = config.getoption("lane")
    if lane is None:
        return
    keep, drop = [], []
    for item in items:
        name = item.nodeid.split("[", 1)[0]
        busy = name in BUSY_TESTS or name.split("::", 1)[0] in BUSY_TESTS
        (keep if busy == (lane == "busy") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _collect_results() -> Iterator[None]:
    """Collect each test's garbage while its servers still run: a Celery AsyncResult left to the
    interpreter's exit unsubscribes from a Redis that is gone, and the error it raises then
    cannot be reported cleanly.

    What survives the collection is then frozen (``gc.freeze``): the next test's collection
    looks only at what that test made. A full collection over everything the suite has
    imported took about 90 ms, after each of some 750 tests."""
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the run, on a free loopback port."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the private server, emptied before each test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private Redis Cluster of three masters (started on first use)."""
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def keyspace() -> Keyspace:
    """The keyspace the tests share."""
    return Keyspace(SECRET, prefix="t")


@pytest.fixture
def clock() -> ManualClock:
    """A clock that only moves when a test moves it."""
    return ManualClock(T0)


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    """A client of the private cluster, every master emptied before each test."""
    client = redis_cluster.client()
    client.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture(params=["redis", "cluster", "memory"])
def store(request: pytest.FixtureRequest, keyspace: Keyspace, clock: ManualClock) -> BaseStore:
    """Each core test runs against one Redis, a 3-master Redis Cluster and the in-process
    store."""
    if request.param == "redis":
        return RedisStore(request.getfixturevalue("redis_client"), keyspace)
    if request.param == "cluster":
        return RedisStore(request.getfixturevalue("cluster_client"), keyspace, clock=clock)
    return MemoryStore(keyspace, clock=clock)


def make_app(server: RedisServer, **conf: Any) -> Celery:
    """A Celery app on the private server: broker db 1, results db 2, store db 0."""
    base = server.url.rsplit("/", 1)[0]
    app = Celery(
        f"gate{next(_apps)}", broker=f"{base}/1", backend=f"{base}/2", set_as_current=False
    )
    # Each test's tasks belong to its own app only (Celery shares decorated tasks by default).
    app.task = functools.partial(app.task, shared=False)  # type: ignore[method-assign]
    app.conf.update(
        throttle_redis_url=f"{base}/0",
        throttle_key_secret=SECRET,
        throttle_max_defer=0.5,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
        # A consumer waits up to this long on the broker before it sees a stop: a short wait
        # makes each in-process worker stop in a tenth of a second instead of a second.
        broker_transport_options={"polling_interval": 0.1},
    )
    app.conf.update(conf)
    return app


@pytest.fixture
def worker() -> Iterator[Callable[[Celery], Any]]:
    """Start an in-process worker for an app (stopped at the end of the test)."""
    stack: list[Any] = []

    def start(app: Celery, **kwargs: Any) -> Any:
        kwargs = {"pool": "threads", "concurrency": 2, **kwargs}
        context = start_worker(app, perform_ping_check=False, **kwargs)
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def record() -> Iterator[Callable[[Any], list[dict[str, Any]]]]:
    """Collect every sending of a signal during the test."""
    receivers: list[tuple[Any, Callable[..., None]]] = []

    def listen(signal: Any) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []

        def receiver(**kw: Any) -> None:
            seen.append(kw)

        signal.connect(receiver, weak=False)
        receivers.append((signal, receiver))
        return seen

    yield listen
    for signal, receiver in receivers:
        signal.disconnect(receiver)


@contextlib.contextmanager
def events_of(app: Celery, kind: str, wanted: int) -> Iterator[list[dict[str, Any]]]:
    """Collect the ``kind`` events of ``app`` sent inside the block; on leaving, wait until
    ``wanted`` arrived (fail after TIMEOUT). The receiver is bound before the block runs."""
    events: list[dict[str, Any]] = []
    enough = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if len(events) >= wanted:
            enough.set()

    ready = threading.Event()
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={kind: on_event}, app=app)
        receiver.on_consume_ready = lambda *a, **k: ready.set()
        listener = threading.Thread(target=receiver.capture, kwargs={"wakeup": False})
        listener.start()
        try:
            assert ready.wait(TIMEOUT)  # bound to the event exchange before anything is sent
            yield events
            assert enough.wait(TIMEOUT), f"{len(events)} {kind} event(s), wanted {wanted}"
        finally:
            receiver.should_stop = True
            listener.join(TIMEOUT)
