# SPDX-License-Identifier: MIT
"""``celery worker`` subprocesses for the suite: started with a test's configuration, waited
for by ping, killed or stopped on demand, always cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent

#: Limits the worker app's tasks use, unless a test overrides them.
DEFAULT_LIMITS: dict[str, Any] = {
    "per-key": {"rate": "1000/s", "burst": 1000},
    "per-agent": {"rate": "1000/s", "burst": 1000, "per": ["api_key", "agent_id"]},
}


def worker_argv(
    app: str,
    node: str,
    *,
    pool: str = "prefork",
    concurrency: int = 2,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """The command line of one ``celery worker`` of ``app`` named ``node``, as the suite runs
    them (no gossip or mingle: nodes start and stop independently)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        node,
        "-l",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


class Workers:
    """A set of worker processes of ``tests.workerapp`` sharing one configuration."""

    def __init__(
        self,
        *,
        broker: str,
        backend: str,
        store: str,
        conf: dict[str, Any],
        logdir: Path,
        prefix: str = "t",
        record: str = "",
    ) -> None:
        conf = {**conf, "throttle_limits": {**DEFAULT_LIMITS, **conf.get("throttle_limits", {})}}
        self.env = {
            **os.environ,
            "THROTTLE_TEST_BROKER": broker,
            "THROTTLE_TEST_BACKEND": backend,
            "THROTTLE_TEST_STORE": store,
            "THROTTLE_TEST_CONF": json.dumps(conf),
            "THROTTLE_TEST_PREFIX": prefix,
            "THROTTLE_TEST_RECORD": record,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client = Celery("client", broker=broker, backend=backend, set_as_current=False)
        self.client.conf.update(
            {k: v for k, v in conf.items() if k.startswith(("broker_", "task_"))},
            broker_connection_retry_on_startup=True,
        )

    def start(
        self,
        name: str,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
    ) -> str:
        """Start one worker named ``name@<host>``; return its node name once it answers."""
        node = self.spawn(name, concurrency=concurrency, pool=pool, env=env)
        self.wait_ready(node)
        return node

    def spawn(
        self,
        name: str,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        events: bool = True,
    ) -> str:
        """Start one worker named ``name@<host>`` and return its node name at once. It sends
        task events (``-E``, what Flower reads) unless ``events`` is False: a test that runs
        thousands of tasks and reads no event saves a third of each run's broker traffic."""
        node = f"{name}@{os.uname().nodename}"
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        extra = ["-E"] if events else []
        self.procs[node] = subprocess.Popen(
            worker_argv("tests.workerapp", node, pool=pool, concurrency=concurrency, extra=extra),
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return node

    def wait_ready(self, node: str, timeout: float = 60) -> None:
        """Wait until ``node`` answers a ping (or its process dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[node]
            if proc.poll() is not None:
                raise RuntimeError(f"worker {node} exited with {proc.returncode}: {self.log(node)}")
            try:
                if self.client.control.ping(destination=[node], timeout=0.5):
                    return
            except redis.ConnectionError:
                # A pooled connection the server dropped earlier in the run: kombu raises
                # once and connects again on the next ping.
                continue
        raise RuntimeError(f"worker {node} did not answer within {timeout} s: {self.log(node)}")

    def log(self, node: str) -> str:
        path = self.logdir / f"{node.split('@')[0]}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def wait_exit(self, node: str, timeout: float = 60) -> int:
        """Wait for a worker that is to die by itself; return its exit code."""
        proc = self.procs.pop(node)
        code = proc.wait(timeout=timeout)
        _kill_tree(proc.pid, signal.SIGKILL)  # orphaned pool children, if any
        return code

    def kill(self, node: str) -> None:
        """SIGKILL a worker's whole process group (main process and pool children)."""
        proc = self.procs.pop(node)
        _kill_tree(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every worker: warm shutdown, then SIGKILL whatever is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        self.client.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill_tree(pid: int, sig: int) -> None:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in [psutil.Process(pid), *children]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)
