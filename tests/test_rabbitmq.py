# SPDX-License-Identifier: MIT
"""examples/rabbitmq_quorum.py as a real ``celery worker`` on RabbitMQ: quorum queues, deferrals
through the broker's native delayed delivery, the store on the suite's private Redis.

Needs the RabbitMQ on ``THROTTLE_TEST_RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``);
the test fails, never skips, when it is not there. Each run uses a queue and exchange of its own
and deletes them afterwards. The delay ladder (``celery_delayed_0`` ... ``celery_delayed_27`` and
``celery_delayed_delivery``) is shared by every Celery worker of the virtual host, declared
identically by each, and left in place.

When this module is imported by the worker (``--include``) with ``THROTTLE_TEST_PROBE`` set, it
records every task start and every deferral in Redis, so the test can check them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import Celery
from celery.signals import task_prerun
from kombu import Connection, Exchange, Queue

from tests.redis_servers import RedisServer
from tests.workers import worker_argv

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = os.environ.get("THROTTLE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
PROBE_ENV = "THROTTLE_TEST_PROBE"
TIMEOUT = 60
#: The raw API key the tasks are sent with: it must never show in the worker's log.
API_KEY = "sk-rabbit-raw-key-0123456789"
#: The binary delay prefix native delayed delivery puts in front of a routing key.
LADDER_KEY = re.compile(r"^(?:[01]\.){28}")


# -- the probe, in the worker process ------------------------------------------------------------


def _install_probe(url: str) -> None:
    """Record starts (in pool children) and deferrals (in the main process) in Redis."""
    from throttle import signals

    clients: dict[int, redis.Redis] = {}

    def db() -> redis.Redis:
        pid = os.getpid()
        if pid not in clients:
            clients[pid] = redis.Redis.from_url(url)
        return clients[pid]

    def started(task_id: str = "", task: Any = None, **_: Any) -> None:
        request = task.request
        entry = {
            "id": task_id,
            "deferrals": getattr(request, "throttle_deferrals", None) or 0,
            "routing_key": (request.delivery_info or {}).get("routing_key", ""),
        }
        db().rpush("probe:starts", json.dumps(entry))

    def deferred(sender: Any = None, **fields: Any) -> None:
        fields.pop("signal", None)
        db().rpush("probe:deferrals", json.dumps(fields, default=str))

    task_prerun.connect(started, weak=False)
    signals.task_throttled.connect(deferred, weak=False)


if os.environ.get(PROBE_ENV):
    _install_probe(os.environ[PROBE_ENV])


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def rabbitmq() -> str:
    """The RabbitMQ URL, after checking that the broker answers (fail, not skip, if not)."""
    conn = Connection(RABBITMQ_URL, connect_timeout=5)
    try:
        conn.connect()
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ is not reachable at {conn.as_uri()} ({exc!r}): start a RabbitMQ 3.10+ "
            "there (guest/guest) or point THROTTLE_TEST_RABBITMQ_URL at one",
            pytrace=False,
        )
    finally:
        conn.release()
    return RABBITMQ_URL


@pytest.fixture
def queue_name(rabbitmq: str) -> Iterator[str]:
    """A queue and topic exchange name of this run only; both are deleted afterwards."""
    name = f"throttle-test-{uuid.uuid4().hex[:12]}"
    yield name
    with Connection(rabbitmq) as conn:
        channel = conn.channel()
        with contextlib.suppress(Exception):
            _queue(name)(channel).delete()
        with contextlib.suppress(Exception):
            Exchange(name, type="topic")(channel).delete()


def _queue(name: str) -> Queue:
    return Queue(
        name,
        Exchange(name, type="topic", durable=True),
        routing_key=name,
        queue_arguments={"x-queue-type": "quorum"},
    )


class ExampleWorker:
    """One ``celery -A examples.rabbitmq_quorum worker`` subprocess (prefork, 2 slots)."""

    def __init__(self, env: dict[str, str], node: str, log: Path) -> None:
        self.node = node
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                worker_argv(
                    "examples.rabbitmq_quorum", node, extra=["--include", "tests.test_rabbitmq"]
                ),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, client: Celery, timeout: float = 60) -> None:
        """Wait until the worker answers a ping (or its process dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if client.control.ping(destination=[self.node], timeout=0.5):
                return
        raise RuntimeError(f"worker did not answer within {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Warm shutdown; SIGKILL the whole tree if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(self.proc.pid)
                for process in [*parent.children(recursive=True), parent]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            self.proc.wait(timeout=10)


def _client(broker: str, backend: str, queue: str) -> Celery:
    """A publisher that routes like the example: to its quorum queue through a topic exchange."""
    client = Celery("rabbit-client", broker=broker, backend=backend, set_as_current=False)
    client.conf.update(
        task_queues=[_queue(queue)],
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_exchange_type="topic",
        task_default_routing_key=queue,
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
    )
    return client


def _wait_drained(client: Celery, queue: str, node: str, timeout: float = 30) -> None:
    """Wait until the queue is empty and the worker holds nothing (reserved or scheduled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with client.connection_for_write() as conn:
            _, ready, _ = _queue(queue)(conn.channel()).queue_declare(passive=True)
        inspect = client.control.inspect(destination=[node], timeout=1)
        held = [
            *((inspect.reserved() or {}).get(node) or []),
            *((inspect.scheduled() or {}).get(node) or []),
            *((inspect.active() or {}).get(node) or []),
        ]
        if ready == 0 and not held:
            return
    raise AssertionError(f"queue {queue} or worker {node} still hold work after {timeout} s")


# -- the test ------------------------------------------------------------------------------------


def test_deferrals_wait_in_rabbitmq_and_every_task_runs_once(
    rabbitmq: str,
    queue_name: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """24 tasks under one API key at 120/m burst 5, countdowns capped at 3.5 s: every task runs
    exactly once, the rest are deferred (some several times) and come back through the broker's
    delay ladder, and the raw API key never shows in the worker's log."""
    tasks = 24
    env = {
        **os.environ,
        "RABBITMQ_URL": rabbitmq,
        "REDIS_URL": redis_server.url,
        "AGENTS_QUEUE": queue_name,
        "THROTTLE_MAX_DEFER": "3.5",
        PROBE_ENV: redis_server.url,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    node = f"{queue_name}@{os.uname().nodename}"
    client = _client(rabbitmq, redis_server.url, queue_name)
    worker = ExampleWorker(env, node, tmp_path / "worker.log")
    try:
        worker.wait_ready(client)
        results = [
            client.send_task(
                "rabbitmq_quorum.call_model",
                (f"task {i} says hello",),
                {"api_key": API_KEY, "agent_id": "researcher"},
            )
            for i in range(tasks)
        ]
        answers = [r.get(timeout=TIMEOUT) for r in results]
        _wait_drained(client, queue_name, node)
        starts = [json.loads(x) for x in redis_client.lrange("probe:starts", 0, -1)]
        deferrals = [json.loads(x) for x in redis_client.lrange("probe:deferrals", 0, -1)]
    finally:
        worker.stop()
        client.close()
    log = worker.log()

    assert answers == [f"task {i} says" for i in range(tasks)]
    sent = {r.id for r in results}
    runs = Counter(s["id"] for s in starts)
    assert set(runs) == sent, "a task never ran"
    assert max(runs.values()) == 1, f"a task ran twice: {runs.most_common(1)}"

    deferred = Counter(d["task_id"] for d in deferrals)
    # 5 at once (the burst); the others, sent within far less than a second, wait for their
    # slots 0.5 s apart, up to 9.5 s away: those more than 3.5 s away check in again, and come
    # back through the ladder each time. (Half of them is the bound, so a slow machine that
    # refills a few tokens while the tasks arrive does not matter.)
    assert len(deferred) >= tasks // 2, deferred
    assert max(deferred.values()) >= 2, deferred
    for start in starts:
        if start["id"] in deferred:
            assert start["deferrals"] == deferred[start["id"]], start
            assert LADDER_KEY.match(start["routing_key"]), start
            assert start["routing_key"].endswith(queue_name), start
    assert "could not publish" not in log, log[-3000:]
    assert "ERROR" not in log, log[-3000:]
    assert API_KEY not in log
