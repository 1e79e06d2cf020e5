# SPDX-License-Identifier: MIT
"""What the benchmark scripts share: the Redis server they measure against, ``celery worker``
subprocesses, and one table form for their results, as text or Markdown."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
#: The workers' log level (their logs go to a temporary directory): BENCH_WORKER_LOGLEVEL=DEBUG
#: shows every deferral and its reason when a run needs explaining.
LOGLEVEL = os.environ.get("BENCH_WORKER_LOGLEVEL", "WARNING")


@contextmanager
def redis_server(given: str | None) -> Iterator[tuple[str, str]]:
    """The server to run against (``--redis-url``, else a private redis-server started for
    the run), and a description of it."""
    if given:
        yield given, "given by --redis-url"
        return
    # The private server helper lives in the test package, at the repository root.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.redis_servers import RedisServer

    with RedisServer() as server:
        yield server.url, "private redis-server started for this run"


def table(rows: Sequence[Sequence[str]], markdown: bool, right: Sequence[bool]) -> str:
    """``rows[0]`` is the header; ``right`` says which columns are right-aligned (numbers)."""
    head, *body = rows
    if markdown:
        lines = ["| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- worker processes -------------------------------------------------------------------------


_LIVE: set[int] = set()  # pids of worker main processes not yet stopped


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_LIVE):
        _kill_tree(pid)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _LIVE.discard(pid)


class Workers:
    """``celery -A <app> worker`` subprocesses sharing one environment (the app reads its
    configuration from it)."""

    def __init__(self, app: str, env: dict[str, str], broker: str, logdir: Path, tag: str) -> None:
        self.app = app
        self.env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.logdir = logdir
        self.tag = tag
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # No result backend on the client: it reads results straight from Redis, and does not
        # subscribe to a result channel per task it sends.
        self.client = Celery(f"bench-{tag}", broker=broker, set_as_current=False)
        self.client.conf.update(broker_connection_retry_on_startup=True)

    @property
    def nodes(self) -> list[str]:
        return list(self.procs)

    def start(self, count: int, *, concurrency: int = 2, queue: str | None = None) -> list[str]:
        """Start ``count`` workers together; return their node names once all answer."""
        host = os.uname().nodename
        for n in range(count):
            name = f"{self.tag}{n}"
            node = f"{name}@{host}"
            command = [
                sys.executable,
                *("-m", "celery", "-A", self.app, "worker", "-P", "prefork"),
                *("-c", str(concurrency), "-n", node, "-l", LOGLEVEL),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ]
            if queue:
                command += ["-Q", queue]
            with open(self.logdir / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
                )
            self.procs[node] = proc
            _LIVE.add(proc.pid)
        self._wait_ready(timeout=90)
        return self.nodes

    def _wait_ready(self, timeout: float) -> None:
        waiting = set(self.procs)
        deadline = time.monotonic() + timeout
        while waiting:
            for node in waiting:
                proc = self.procs[node]
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"worker {node} exited with {proc.returncode}:\n{self.log(node)}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} did not answer within {timeout} s")
            for reply in self.client.control.ping(destination=sorted(waiting), timeout=0.5):
                waiting -= set(reply)

    def log(self, node: str) -> str:
        path = self.logdir / f"{node.split('@')[0]}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def control(self, command: str, **arguments: Any) -> dict[str, Any]:
        """A control command to every worker, with its replies by node (waits for all)."""
        replies = self.client.control.broadcast(
            command,
            arguments=arguments,
            destination=self.nodes,
            reply=True,
            limit=len(self.nodes),
            timeout=3.0,
        )
        return {node: body for reply in replies or () for node, body in reply.items()}

    def scheduled(self) -> dict[str, int]:
        """``celery inspect scheduled``: countdown/ETA requests each worker holds."""
        inspect = self.client.control.inspect(
            destination=self.nodes, limit=len(self.nodes), timeout=3.0
        )
        return {node: len(entries) for node, entries in (inspect.scheduled() or {}).items()}

    def rss(self) -> dict[str, int]:
        """Resident memory per worker: its main process plus its pool children, in bytes."""
        out = {}
        for node, proc in self.procs.items():
            total = 0
            with contextlib.suppress(psutil.NoSuchProcess):
                main = psutil.Process(proc.pid)
                for process in [main, *main.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += process.memory_info().rss
            out[node] = total
        return out

    def kill(self) -> None:
        """SIGKILL every worker and its pool children (after an error or an interrupt)."""
        for proc in self.procs.values():
            _kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()
        with contextlib.suppress(Exception):
            self.client.close()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL for whatever is left after 30 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait(timeout=10)
            _kill_tree(proc.pid)  # orphaned pool children, if any
            _LIVE.discard(proc.pid)
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
        if exc_type is None:
            self.stop()
        else:
            self.kill()
