# SPDX-License-Identifier: MIT
"""``make demo``: an agent platform on Celery with throttle, under load, for about two minutes.

Run from the repository root: ``python -m examples.demo [--duration 120] [--no-live]
[--chart PATH] [--json-summary PATH] [--flower]``.

It starts, and stops again (also on an error or Ctrl-C):

- Redis: ``REDIS_URL`` when given (the demo clears and uses the keys under ``agents:`` there),
  else a private ``redis-server`` on a free loopback port, as the test suite does;
- a SIMULATED LLM provider on loopback (``examples/agents/provider.py``): latency, token usage,
  a capacity of 20 requests/s per API key (4 for the admin tier's key), 429 with
  ``Retry-After`` above it;
- two ``celery -A examples.agents.app worker`` processes (prefork, 8 slots each) with throttle;
- the producer (``examples/agents/producer.py``): three API keys in the tiers default, agent and
  admin, several agents each, and one runaway agent that loops a thousand tool calls;
- with ``--flower``, Flower on http://127.0.0.1:5555 with throttle's Flower configuration.

Meanwhile a live view shows, per API key and agent, what Celery's task events and throttle's
``task-throttled`` events say (``--no-live``: a plain line every few seconds). At the end: the
configured against the achieved rate of each key, deferrals per task, the provider's 429s, the
count of tasks enqueued, completed once and still waiting (nothing lost, nothing run twice),
and a PNG chart of admissions per second per key against each key's limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
CONCURRENCY = 8
PROVIDER_CAPACITY = 20.0  # requests/s per API key, at the simulated provider
#: Keys on a smaller plan at the provider: the admin tier's key gets less there (4/s) than
#: its tier here allows (5/s), so its 429s show the upstream feedback.
PROVIDER_CAPACITIES = {"initech": 4.0}
FLOWER_PORT = 5555
PLAIN_EVERY = 5.0  # seconds between two lines of --no-live


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--no-live", action="store_true", help="plain lines, for logs and CI")
    parser.add_argument(
        "--chart",
        type=Path,
        default=Path(tempfile.gettempdir()) / "throttle-demo.png",
        help="where the PNG chart goes",
    )
    parser.add_argument("--json-summary", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--flower", action="store_true", help="also start Flower on :5555")
    parser.add_argument("--seed", type=int, default=7, help="of the producer's plan")
    parser.add_argument("--hold-redis", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration < 10:
        parser.error("--duration must be at least 10 seconds")
    return args


class Interrupted(Exception):
    """Ctrl-C: stop the traffic, then summarise what ran."""


class Demo:
    """Everything the demo starts, and how to stop it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.logdir = Path(tempfile.mkdtemp(prefix="throttle-demo-"))
        #: The workers', the producer's and Flower's logs are kept unless all went well.
        self.keep_logs = True
        self.env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self.sessions: list[tuple[str, subprocess.Popen[Any]]] = []  # own process groups
        self.producer: subprocess.Popen[bytes] | None = None
        self.workers: Any = None
        self.feed: EventFeed | None = None
        self.redis_holder: subprocess.Popen[str] | None = None
        self.provider_url = ""
        self.provider_log: list[tuple[float, str, int]] = []
        self.provider_next = 0
        self.factors: list[tuple[float, float, dict[str, float]]] = []

    # -- starting ------------------------------------------------------------------------------

    def start_redis(self) -> str:
        given = os.environ.get("REDIS_URL")
        if given:
            url, where = given, "REDIS_URL (keys under agents: are cleared)"
        else:
            # A holder process in its own session keeps the private server, so that Ctrl-C in
            # the terminal reaches the demo and the workers, not Redis: the summary still
            # reads it.
            holder = subprocess.Popen(
                [sys.executable, "-m", "examples.demo", "--hold-redis"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            self.redis_holder = holder
            self.sessions.append(("redis", holder))
            url, where = _first_line(holder, 30, "the private redis-server"), "private"
        self.env["REDIS_URL"] = os.environ["REDIS_URL"] = url
        from examples.agents.app import PREFIX  # reads REDIS_URL

        client = redis.Redis.from_url(url)
        stale = list(client.scan_iter(f"{PREFIX}:*", count=1000))
        for i in range(0, len(stale), 1000):
            client.unlink(*stale[i : i + 1000])
        client.close()
        print(f"Redis: {_redact(url)} ({where})", flush=True)
        return url

    def start_provider(self) -> None:
        from examples.agents.tenants import TENANTS

        provider = self._session(
            "provider",
            [
                *("-m", "examples.agents.provider", "--port", "0"),
                *("--capacity", f"{PROVIDER_CAPACITY:g}", "--latency", "0.3", "--jitter", "0.4"),
                *(
                    f"--capacity-for={TENANTS[label].api_key[-4:]}={capacity:g}"
                    for label, capacity in PROVIDER_CAPACITIES.items()
                ),
            ],
            stdout=subprocess.PIPE,
        )
        line = _first_line(provider, 30, "the simulated provider")
        self.provider_url = line.rsplit(" ", 1)[-1]
        self.env["PROVIDER_URL"] = os.environ["PROVIDER_URL"] = self.provider_url
        print(line, flush=True)

    def start_workers(self) -> None:
        from _common import Workers  # benchmarks/_common.py: `celery worker` subprocesses

        from examples.agents.app import app

        workers = Workers(
            "examples.agents.app",
            {"REDIS_URL": self.env["REDIS_URL"], "PROVIDER_URL": self.provider_url},
            self.env["REDIS_URL"],
            self.logdir,
            "agents-",
        )
        workers.client.conf.broker_transport_options = app.conf.broker_transport_options
        self.workers = workers
        nodes = workers.start(WORKERS, concurrency=CONCURRENCY)
        print(f"Workers: {', '.join(nodes)} (prefork x {CONCURRENCY}, task events on)")

    def start_flower(self) -> None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", FLOWER_PORT)) == 0:
                raise RuntimeError(f"port {FLOWER_PORT} is taken: is another Flower running?")
        found = subprocess.run(
            [sys.executable, "-m", "throttle.celeryext.flower"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        command = [
            *("-m", "celery", "-A", "examples.agents.app", "flower"),
            *("--address=127.0.0.1", f"--port={FLOWER_PORT}"),
        ]
        conf = found.stdout.strip().splitlines()[-1] if found.returncode == 0 else ""
        if conf and Path(conf).exists():
            command.append(f"--conf={conf}")
            note = f"with throttle's configuration ({conf})"
        else:
            note = (
                "WITHOUT throttle's configuration: `python -m throttle.celeryext.flower` "
                "did not give a config file (throttle/celeryext/flower.py not available yet)"
            )
        with open(self.logdir / "flower.log", "ab") as log:
            self._session("flower", command, stdout=log)
        url = f"http://127.0.0.1:{FLOWER_PORT}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code < 500:
                    break
            self._check_alive()
            time.sleep(0.2)  # polling a server that is starting
        else:
            raise RuntimeError(f"Flower did not answer on {url}: see {self.logdir}/flower.log")
        print(f"Flower: {url} {note}", flush=True)

    def start_feed(self) -> EventFeed:
        from examples.agents.board import Board
        from examples.agents.producer import RUNAWAY

        records = redis.Redis.from_url(self.env["REDIS_URL"])
        board = Board(lambda task_id: _whose(records, task_id), RUNAWAY)
        feed = EventFeed(board)
        self.feed = feed
        feed.start()
        # The receiver is live once it hears every worker: ask them for a heartbeat until it
        # does (one sent before its subscription is in place would be missed).
        deadline = time.monotonic() + 30
        nodes = set(self.workers.nodes)
        while not nodes <= board.workers:
            if feed.error is not None:
                raise RuntimeError(f"the event receiver failed: {feed.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no events from workers {sorted(nodes - board.workers)}")
            self.workers.client.control.broadcast("heartbeat", destination=sorted(nodes))
            time.sleep(0.5)  # the answers come as events, to the receiver thread
        return feed

    def settle(self) -> None:
        """Wait until the load factor is 1: the traffic starts on a platform at rest (a
        REDIS_URL shared with other workers may say otherwise; then it starts anyway)."""
        from examples.agents.app import app
        from throttle.celeryext.worker import extension

        store = extension(app).store()
        deadline = time.monotonic() + 30
        factor = store.load_factor().in_force
        while factor < 1.0 and time.monotonic() < deadline:
            time.sleep(0.5)  # the workers sample their load once a second
            factor = store.load_factor().in_force
        if factor < 1.0:
            print(f"Load factor still {factor:.2f}: this machine is busy; starting anyway.")

    def start_producer(self) -> None:
        with open(self.logdir / "producer.log", "ab") as log:
            self.producer = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "examples.agents.producer", "--duration", f"{self.args.duration:g}"),
                    *("--seed", str(self.args.seed)),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _session(self, name: str, args: list[str], stdout: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: stopped by the demo, not by ^C
        )
        self.sessions.append((name, proc))
        return proc

    def _check_alive(self) -> None:
        for name, proc in self.sessions:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} (logs: {self.logdir})")
        if self.workers is not None:
            for node, proc in self.workers.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {node} exited:\n{self.workers.log(node)}")

    # -- running -------------------------------------------------------------------------------

    def run(self) -> int:
        self.start_redis()
        self.start_provider()
        self.start_workers()
        if self.args.flower:
            self.start_flower()
        feed = self.start_feed()
        self.settle()
        records = redis.Redis.from_url(self.env["REDIS_URL"])
        self.start_producer()
        started = self._wait_started(records)
        end = started + self.args.duration
        interrupted = False
        previous = signal.signal(signal.SIGINT, _interrupt)
        try:
            self._watch(feed, records, started, end)
        except Interrupted:
            interrupted = True
            print("\nInterrupted: stopping the traffic, then the summary.", flush=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        end = min(end, time.time())
        print("Stopping the producer and the workers (deferred work goes back to the broker)")
        self.stop_traffic()
        return self.report(records, started, end, interrupted)

    def _wait_started(self, records: redis.Redis) -> float:
        from examples.agents.app import keys

        deadline = time.monotonic() + 60
        while True:
            started = records.hget(keys("producer"), "started")
            if started is not None:
                return float(started)
            assert self.producer is not None
            if self.producer.poll() is not None:
                log = (self.logdir / "producer.log").read_text(errors="replace")
                raise RuntimeError(f"the producer exited:\n{log[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the producer did not start within 60 s")
            time.sleep(0.1)  # until the producer records its start

    def _watch(self, feed: EventFeed, records: redis.Redis, started: float, end: float) -> None:
        """Keep the view up to date until the end of the traffic."""
        from rich.console import Console
        from rich.live import Live

        board = feed.board
        console = Console()
        next_poll = next_line = 0.0
        with contextlib.ExitStack() as stack:
            live = None
            if not self.args.no_live:
                live = stack.enter_context(
                    Live(console=console, refresh_per_second=4, redirect_stdout=False)
                )
            while True:
                now = time.time()
                if now >= next_poll:
                    self._poll(board, records)
                    self._check_alive()
                    next_poll = now + 1.0
                elapsed = min(now, end) - started
                if live is not None:
                    live.update(board.render(elapsed, self.args.duration))
                elif now >= next_line or now >= end:
                    print(board.line(elapsed), flush=True)
                    next_line = now + PLAIN_EVERY
                if now >= end:
                    return
                time.sleep(0.25)  # the view's refresh period

    def _poll(self, board: Any, records: redis.Redis) -> None:
        """Once a second: the provider's answers, the producer's counts, the store's state."""
        from examples.agents.app import app, keys
        from examples.agents.tenants import TENANTS
        from throttle.celeryext.worker import extension

        self._provider_stats()
        board.set_provider(_count(self.provider_log))
        counts: dict[bytes, bytes] = records.hgetall(keys("enqueued"))  # type: ignore[assignment]
        board.set_enqueued((*k.decode().split(" ", 1), int(v)) for k, v in counts.items())
        ext = extension(app)
        store = ext.store()
        with contextlib.suppress(Exception):  # the view goes on if one read fails
            load = store.load_factor().in_force
            upstream = {}
            for label, tenant in TENANTS.items():
                tag = ext.keyspace.tenant_tag({"api_key": tenant.api_key})
                value = records.get(ext.keyspace.upstream_key(tag))
                upstream[label] = float(value) if value else 1.0
            board.set_factors(load, upstream)
            self.factors.append((time.time(), load, upstream))
            for label, agent in [(label, None) for label in TENANTS] + board.agents():
                tenant = TENANTS[label]
                names = ["llm-requests", "llm-tokens"] if agent is None else ["agent-share"]
                limits = [ext.settings.policy(n, tenant.tier).limit for n in names]
                who = {"api_key": tenant.api_key}
                if agent is not None:
                    who["agent_id"] = agent
                decision = store.peek(limits, who, adaptive=True)
                board.set_slot(label, agent, decision.retry_after, decision.bound_by)

    def _provider_stats(self) -> None:
        from examples.agents.provider import key_hint
        from examples.agents.tenants import TENANTS

        labels = {key_hint(t.api_key): label for label, t in TENANTS.items()}
        try:
            answer = httpx.get(
                self.provider_url.split("/v1/", 1)[0] + "/stats",
                params={"since": self.provider_next},
                timeout=2,
            ).json()
        except (httpx.HTTPError, ValueError):
            return
        offset = time.time() - float(answer["now"])
        for t, hint, status in answer["log"]:
            self.provider_log.append((float(t) + offset, labels.get(hint, hint), int(status)))
        self.provider_next = int(answer["next"])

    # -- stopping and the summary --------------------------------------------------------------

    def stop_traffic(self) -> None:
        """Stop the producer, then the workers (a warm shutdown gives the deferred work they
        hold back to the broker), then the event receiver."""
        if self.producer is not None and self.producer.poll() is None:
            self.producer.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.producer.wait(timeout=10)
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.feed is not None:
            self.feed.stop()

    def report(self, records: redis.Redis, started: float, end: float, interrupted: bool) -> int:
        from rich.console import Console

        from examples.agents import report

        self._provider_stats()
        run = report.collect(records, started, end, self.provider_log, self.factors)
        path = self.args.chart.resolve()
        summary = report.summarise(
            run, duration=self.args.duration, interrupted=interrupted, chart=str(path)
        )
        if self.feed is not None:
            summary["events"] = dict(self.feed.board.events)
        report.chart(run, summary, path)
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)  # logs: wide enough for the tables
        console.print()
        report.print_summary(console, summary)
        console.print(f"Chart: {path}")
        if self.args.json_summary:
            self.args.json_summary.write_text(json.dumps(summary, indent=2, sort_keys=True))
            console.print(f"Summary as JSON: {self.args.json_summary.resolve()}")
        tasks = summary["tasks"]
        if tasks["lost"] or tasks["completed_twice"]:
            return 1
        self.keep_logs = interrupted
        return 130 if interrupted else 0

    def close(self) -> None:
        """Stop whatever is still running, in reverse order (a second Ctrl-C waits for this)."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if self.producer is not None and self.producer.poll() is None:
                self.producer.kill()
                self.producer.wait(timeout=10)
            if self.workers is not None:
                self.workers.kill()
            if self.feed is not None:
                self.feed.stop()
            for name, proc in reversed(self.sessions):
                _stop_group(name, proc, self.redis_holder)
            if self.keep_logs:
                print(f"Logs: {self.logdir}", flush=True)
            else:
                shutil.rmtree(self.logdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


class EventFeed(threading.Thread):
    """Celery's event receiver in a thread, feeding the board."""

    def __init__(self, board: Any) -> None:
        super().__init__(name="event-feed", daemon=True)
        self.board = board
        self.error: BaseException | None = None
        self._receiver: Any = None
        self._stopping = threading.Event()

    def run(self) -> None:
        from examples.agents.app import app

        try:
            with app.connection_for_read() as connection:
                self._receiver = app.events.Receiver(
                    connection, handlers={"*": self.board.on_event}
                )
                if self._stopping.is_set():
                    return
                # wakeup: the workers answer with a heartbeat, which shows the feed is live.
                self._receiver.capture(limit=None, timeout=None, wakeup=True)
        except Exception as exc:
            if not self._stopping.is_set():
                self.error = exc

    def stop(self) -> None:
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        self.join(timeout=5)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def _stop_group(name: str, proc: subprocess.Popen[Any], holder: Any) -> None:
    """Stop a child that runs in its own process group: politely, then SIGKILL the group."""
    if proc is holder and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the holder stops its redis-server and exits
    elif proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop: killing it", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _first_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    stream: IO[str] | None = proc.stdout
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    line = stream.readline().strip() if ready else ""
    if not line:
        raise RuntimeError(f"{what} did not start (exit status {proc.poll()})")
    return line


def _whose(records: redis.Redis, task_id: str) -> tuple[str, str] | None:
    from examples.agents.app import keys

    value = records.hget(keys("tasks"), task_id)
    if value is None:
        return None
    tenant, agent, _ = value.decode().split(" ", 2)
    return tenant, agent


def _count(log: list[tuple[float, str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, status in log:
        out[str(status)] = out.get(str(status), 0) + 1
    return out


def _pythonpath() -> str:
    return os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")) if p
    )


def _redact(url: str) -> str:
    from throttle.celeryext.settings import redact_url

    return redact_url(url)


def hold_redis() -> None:
    """``--hold-redis``: a private redis-server for the demo, kept until stdin closes (the demo
    closes it, or dies). Prints the server's URL first."""
    from tests.redis_servers import RedisServer

    signal.signal(signal.SIGTERM, _exit)
    with RedisServer() as server:
        print(server.url, flush=True)
        sys.stdin.read()


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for path in (str(ROOT), str(ROOT / "benchmarks")):
        if path not in sys.path:
            sys.path.insert(0, path)
    if args.hold_redis:
        hold_redis()
        return 0
    demo = Demo(args)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\nInterrupted.", flush=True)
        return 130
    finally:
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
