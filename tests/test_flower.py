# SPDX-License-Identifier: MIT
"""The Flower configuration (``throttle/celeryext/flower.py``): its patch of Celery's event
state fed with the events a worker sends, and a real Flower process watching a real worker."""

from __future__ import annotations

import json
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery.events.state import State

from tests.redis_servers import RedisServer
from tests.workers import ROOT, Workers
from throttle import Keyspace
from throttle.celeryext import flower as conf

WORKER_SECRET = "suite-secret-for-worker-processes"
RAW_KEY = "sk-raw-key-that-must-never-show-0123456789"
TIMEOUT = 30


# -- a Flower process -----------------------------------------------------------------------------


@contextmanager
def flower_process(env: dict[str, str], log: Path, timeout: float = TIMEOUT) -> Iterator[str]:
    """Run ``celery -A tests.workerapp flower`` with throttle's --conf on a free loopback port
    (its API open, for tests only); yield its base URL once it answers; always stop it."""
    handle = open(log, "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.workerapp",
            "flower",
            "--address=127.0.0.1",
            "--port=0",
            f"--conf={conf.config_path()}",
        ],
        cwd=ROOT,
        env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    try:
        # Flower logs the port it bound ("Visit me at http://127.0.0.1:<port>").
        port = poll(
            lambda: _port(log, proc), timeout, lambda: f"Flower did not start: {_tail(log)}"
        )
        url = f"http://127.0.0.1:{port}"
        poll(lambda: _answers(url), timeout, lambda: f"Flower does not answer: {_tail(log)}")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def poll(check: Callable[[], Any], timeout: float, failure: Callable[[], str]) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(failure())


def _port(log: Path, proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        raise AssertionError(f"Flower exited with {proc.returncode}: {_tail(log)}")
    found = re.search(r"Visit me at http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample of Flower's /metrics, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_for_events(url: str, node: str) -> None:
    """Wait until Flower has received an event of ``node`` (its heartbeat): it listens now."""
    poll(
        lambda: metric(url, "flower_worker_online", worker=node) == 1.0,
        TIMEOUT,
        lambda: f"Flower saw no event of {node}",
    )


# -- the configuration file ----------------------------------------------------------------------


def test_the_module_prints_its_path_for_flower_conf() -> None:
    """``python -m throttle.celeryext.flower`` prints the path to pass to ``flower --conf``."""
    out = subprocess.run(
        [sys.executable, "-m", "throttle.celeryext.flower"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(out.strip()) == conf.config_path()
    assert conf.config_path().is_file()


def test_the_module_imports_and_installs_nothing_without_flower() -> None:
    """Without Flower (as in a worker) the module imports, and ``install`` only warns."""
    code = (
        "import sys; sys.modules['flower'] = None\n"
        "from throttle.celeryext import flower\n"
        "assert flower.install() is False\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Flower is not importable" in result.stderr


def test_the_conf_file_patches_flower_and_sets_no_option() -> None:
    """Read as Flower reads --conf, the file patches Flower's event state and metrics and
    leaves every Flower and tornado option as it was (environment and command line decide)."""
    import flower.events
    import flower.options  # defines the options Flower reads
    from tornado.options import options

    before = options.as_dict()
    options.parse_config_file(str(conf.config_path()), final=False)
    assert options.as_dict() == before
    assert flower.events.EventsState.Task is conf.ThrottledTask
    observe = flower.events.PrometheusMetrics.observe_task
    assert conf.install() is True  # again: nothing wrapped twice
    assert flower.events.PrometheusMetrics.observe_task is observe


# -- the event state -----------------------------------------------------------------------------


class ThrottleState(State):
    Task = conf.ThrottledTask


class Events:
    """Feeds one task's events, as a worker sends them, to an event state."""

    def __init__(self, state: State, uuid: str = "t1") -> None:
        self.state, self.uuid, self.clock, self.now = state, uuid, 0, 1_000.0

    def __call__(self, kind: str, **fields: Any) -> str:
        self.clock += 1
        self.now += 0.5
        event = {
            "type": f"task-{kind}",
            "uuid": self.uuid,
            "hostname": "w0@host",
            "timestamp": self.now,
            "local_received": self.now,
            "clock": self.clock,
            **fields,
        }
        self.state.event(event)
        return str(self.state.tasks[self.uuid].state)

    def eta(self, seconds: float) -> str:
        from datetime import UTC, datetime

        return datetime.fromtimestamp(self.now + seconds, UTC).isoformat()


THROTTLED = {
    "limit": "per-key",
    "key": "n6Kh_R76-vbMyiMu",
    "retry_after": 4.2,
    "countdown": 4.2,
    "deferrals": 1,
    "reason": "booked",
    "rebooked": False,
}
RECEIVED = {"name": "workerapp.record", "args": "(1,)", "kwargs": "{'api_key': 'sk-abc'}"}


def test_a_deferred_task_goes_on_to_started_and_success() -> None:
    """THROTTLED lasts while the deferred copy waits for its slot (received with an ETA ahead),
    then the task shows STARTED and SUCCESS; the throttle fields stay in its (picklable) record."""
    send = Events(ThrottleState())
    assert send("received", **RECEIVED, eta=None) == "RECEIVED"
    assert send("throttled", **THROTTLED) == "THROTTLED"
    assert send("received", **RECEIVED, eta=send.eta(4)) == "THROTTLED"
    assert send("started") == "STARTED"
    assert send("succeeded", result="1", runtime=0.01) == "SUCCESS"
    assert send("throttled", **THROTTLED) == "SUCCESS"  # a late event reopens nothing
    record = send.state.tasks["t1"].as_dict()
    assert {k: record[k] for k in THROTTLED} == THROTTLED
    # Flower's persistent mode pickles the task records.
    restored = pickle.loads(pickle.dumps(send.state.tasks["t1"]))
    assert (type(restored), restored.deferrals) == (conf.ThrottledTask, 1)
    # Celery's own task record stays THROTTLED through the start.
    plain = Events(State())
    for kind, fields in [("received", RECEIVED), ("throttled", THROTTLED), ("started", {})]:
        last = plain(kind, **fields)
    assert last == "THROTTLED"


def test_a_copy_received_when_due_shows_received() -> None:
    """A deferred copy that arrives due (no ETA ahead, as from a broker's delayed delivery)
    makes the task RECEIVED; a revocation or a second deferral replaces THROTTLED as well."""
    send = Events(ThrottleState())
    send("received", **RECEIVED)
    send("throttled", **THROTTLED)
    assert send("received", **RECEIVED, eta=send.eta(-0.1)) == "RECEIVED"
    assert send("throttled", **{**THROTTLED, "deferrals": 2}) == "THROTTLED"
    assert send.state.tasks["t1"].deferrals == 2
    assert send("revoked", terminated=False) == "REVOKED"


def test_a_raw_api_key_argument_is_redacted() -> None:
    """A raw ``api_key`` argument never reaches Flower's task record; the fingerprint that
    ``Throttle(app)`` writes in its place is kept."""
    send = Events(ThrottleState())
    send("received", name="n", args="({'api_key': 'sk-1'},)", kwargs="{'api_key': 'sk-2', 'x': 1}")
    record = json.dumps(send.state.tasks["t1"].as_dict(), default=str)
    assert "sk-1" not in record
    assert "sk-2" not in record
    assert "{'api_key': '[redacted]', 'x': 1}" in record
    shown = "{'api_key': '<api_key n6Kh_R76-vbMyiMu>', 'agent_id': '<agent_id VylyIBZL22ocCkes>'}"
    send("received", name="n", kwargs=shown)
    assert send.state.tasks["t1"].kwargs == shown


# -- Flower against a worker ---------------------------------------------------------------------


@pytest.fixture
def urls(redis_server: RedisServer, redis_client: redis.Redis) -> dict[str, str]:
    """Store db 0, broker db 1, results db 2 of the private server, all empty."""
    base = redis_server.url.rsplit("/", 1)[0]
    return {"store": f"{base}/0", "broker": f"{base}/1", "backend": f"{base}/2"}


# One task per 10 s: the second of two tasks waits 10 s for its slot. The load factor is off, so
# a busy machine does not stretch the wait.
SLOW = {
    "throttle_limits": {"per-key": {"rate": "6/m", "burst": 1}},
    "throttle_adaptive": {"enabled": False},
}


def test_flower_shows_a_throttled_task(urls: dict[str, str], tmp_path: Path) -> None:
    """A real Flower with throttle's conf lists a deferred task under THROTTLED with its throttle
    fields (page and API), counts task-throttled events, ends the task in SUCCESS and leaves
    the prefetched gauge at 0; the raw API key shows nowhere."""
    fingerprint = Keyspace(WORKER_SECRET).fingerprint("api_key", RAW_KEY)
    with Workers(**urls, conf=SLOW, logdir=tmp_path) as workers:
        node = workers.start("w0")
        with flower_process(workers.env, tmp_path / "flower.log") as url:
            wait_for_events(url, node)
            first, second = (
                workers.client.send_task("workerapp.record", (i,), {"api_key": RAW_KEY})
                for i in range(2)
            )
            throttled = poll(
                lambda: httpx.get(f"{url}/api/tasks", params={"state": "THROTTLED"}).json(),
                TIMEOUT,
                lambda: "no task became THROTTLED",
            )
            assert list(throttled) == [second.id]
            task = throttled[second.id]
            assert task["state"] == "THROTTLED"
            assert task["limit"] == "per-key"
            assert task["key"] == fingerprint
            assert 0 < task["retry_after"] <= 10
            assert task["deferrals"] == 1
            assert task["reason"] == "booked"
            # Sent by a plain client: redacted by Flower; its re-published copy: by the worker.
            masked = ("'[redacted]'", f"'<api_key {fingerprint}>'")
            assert task["kwargs"] in [f"{{'api_key': {m}}}" for m in masked]

            page = httpx.get(f"{url}/task/{second.id}").text
            for label, value in [
                ("Status", "THROTTLED"),
                ("Limit", "per-key"),
                ("Key", fingerprint),
                ("Retry after", str(task["retry_after"])),
                ("Deferrals", "1"),
            ]:
                shown = rf"<dt>{label}</dt>\s*<dd>\s*(<span[^>]*>)?{re.escape(value)}\b"
                assert re.search(shown, page), label

            assert metric(url, "flower_events_total", type="task-throttled", worker=node) == 1.0

            assert first.get(timeout=TIMEOUT) == 0
            assert second.get(timeout=TIMEOUT) == 1
            info = poll(
                lambda: _info_when(url, second.id, "SUCCESS"),
                TIMEOUT,
                lambda: f"task still {httpx.get(f'{url}/api/task/info/{second.id}').text}",
            )
            assert info["deferrals"] == 1
            assert info["started"] >= info["received"]
            poll(
                lambda: _info_when(url, first.id, "SUCCESS"),
                TIMEOUT,
                lambda: "the first task did not reach SUCCESS",
            )
            gauge = metric(url, "flower_worker_prefetched_tasks", worker=node)
            assert gauge == 0.0

            seen = [
                httpx.get(f"{url}{path}").text
                for path in ("/api/tasks", f"/task/{second.id}", f"/task/{first.id}", "/metrics")
            ]
            assert not any(RAW_KEY in text for text in seen)
        log = (tmp_path / "flower.log").read_text(errors="replace")
        assert "Traceback" not in log
        assert "throttle: " not in log  # no part of the patch was skipped


def _info_when(url: str, task_id: str, state: str) -> dict[str, Any] | None:
    info: dict[str, Any] = httpx.get(f"{url}/api/task/info/{task_id}").json()
    return info if info.get("state") == state else None
