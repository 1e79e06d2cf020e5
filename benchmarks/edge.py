# SPDX-License-Identifier: MIT
"""What the ASGI middleware costs: requests per second through uvicorn with it and without it.

Run from the repository root: ``python benchmarks/edge.py`` (``make bench-edge``); ``--quick``
runs fewer, shorter rounds, ``--markdown`` prints the table as Markdown. The store is a
private ``redis-server`` started for the run unless ``--redis-url`` is given (its db is then
FLUSHED).

What is measured
    Uvicorn servers run side by side for the whole run, one process each, on uvicorn's own
    HTTP parser and event loop (h11, asyncio) and, where ``uvicorn[standard]`` installed
    them, on httptools and uvloop too (the first line says which were measured): a Starlette
    app with one JSON endpoint, a FastAPI app whose endpoint validates its query and answers
    a pydantic model, and a Starlette endpoint that enqueues a Celery task (``send_task`` to
    a queue on the same Redis as broker, which nothing consumes: it is emptied after each
    round), as the APIs this middleware guards do (``benchmarks/edgeapp.py``); each bare and
    behind ``ThrottleMiddleware`` checking two limits (per API key, and per agent within it)
    that never bind, so every request pays a full admission in Redis and gets its rate
    headers.
    The first Starlette app is also served behind the floor of any such check (``CheckFloor`` in
    ``edgeapp.py``: one admission packed ahead, sent as it is on the same pipelined
    connection, its reply awaited, fixed header fields added), which tells the middleware's
    own work from what any check that asks Redis for each request adds.
    The load comes from this process: a fixed number of keep-alive HTTP/1.1 connections on
    one asyncio loop, each sending its next request as soon as the answer to its last one is
    read (a closed loop), spread over 50 API keys and 5 agents each. Rounds alternate the
    order of each app's servers (bare, throttled, floor, then floor, throttled, bare, ...)
    after an untimed warm-up of each, so drift in the machine's load hits all alike; a round
    counts the answers in a fixed span. Every answer must be a 200, and every answer of a
    throttled (or floor) server must carry its rate headers, or the run fails.

How to read it
    Per app, requests per second of each server (the median of its rounds, and the rounds'
    spread), then throttled / bare, whose goal is at least 0.8; for the first Starlette app, the
    floor's too (floor / bare: no check that asks Redis for each request does better). Each
    server has a CPU of its own (the load and Redis share the other) and keeps it busy: the
    CPU rows give the server's CPU time per answer, whose ratio says the same from the cost
    side, less moved by how a round went. "Other load" says how many CPUs other processes
    kept busy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import redis_server, table, verdict  # noqa: E402

GOAL = 0.8
FRAMEWORKS = ("starlette", "fastapi", "enqueue")
#: Each app's servers, in the order of an even round (odd rounds go the other way).
KINDS = {
    "starlette": ("bare", "throttled", "floor"),
    "fastapi": ("bare", "throttled"),
    "enqueue": ("bare", "throttled"),
}
#: The broker queue of the enqueuing endpoint (``EDGE_QUEUE``), emptied after each round.
QUEUE = "edgebench"
#: How the table names each app.
TITLES = {"starlette": "starlette", "fastapi": "fastapi", "enqueue": "starlette + celery task"}
KEYS = 50
AGENTS = 5
PATH = "/v1/runs"


class Server:
    """One uvicorn process serving ``app`` on a free loopback port."""

    def __init__(self, app: str, redis_url: str, stack: tuple[str, str]) -> None:
        self.app = app
        env = {
            **os.environ,
            "EDGE_REDIS_URL": redis_url,
            "EDGE_QUEUE": QUEUE,
            "PYTHONPATH": str(ROOT),
        }
        http, loop = stack
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--http",
                http,
                "--loop",
                loop,
                "--no-access-log",
                "--log-level",
                "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        """uvicorn says where it listens on its log; port 0 let the kernel pick one."""
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            if "Uvicorn running on http://127.0.0.1:" in line:
                return int(line.rsplit(":", 1)[1].split()[0])
        raise RuntimeError(f"uvicorn {self.app} did not start:\n{''.join(seen)}")

    def cpu(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stacks() -> list[tuple[str, str]]:
    """The HTTP parser and event loop pairs to measure: uvicorn's own (h11, asyncio), and
    those of ``uvicorn[standard]`` (httptools, uvloop) where they are installed."""
    found = [("h11", "asyncio")]
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        return found
    return [*found, ("httptools", "uvloop")]


#: A server: (framework, (http, loop), one of its KINDS).
Key = tuple[str, tuple[str, str], str]


@contextmanager
def servers(redis_url: str, pairs: Sequence[tuple[str, str]]) -> Iterator[dict[Key, Server]]:
    started: dict[Key, Server] = {}
    try:
        for framework in FRAMEWORKS:
            for stack in pairs:
                for kind in KINDS[framework]:
                    app = f"benchmarks.edgeapp:{framework}_{kind}"
                    started[framework, stack, kind] = Server(app, redis_url, stack)
        yield started
    finally:
        for server in started.values():
            server.stop()


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.bad: dict[int, int] = {}
        self.unmarked = 0  # throttled answers without rate headers


async def _connection(
    port: int, index: int, until: float, tally: Tally, marked: bool, counting: list[bool]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key, agent = index % KEYS, (index // KEYS) % AGENTS
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: bench\r\nX-API-Key: bench-key-{key:03d}\r\n"
        f"X-Agent-ID: agent-{agent}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            at = lower.index(b"content-length:") + 15
            await reader.readexactly(int(lower[at : lower.index(b"\r\n", at)]))
            if not counting[0]:
                continue
            status = int(head[9:12])
            if status != 200:
                tally.bad[status] = tally.bad.get(status, 0) + 1
            else:
                tally.ok += 1
                if marked and b"x-ratelimit-remaining:" not in lower:
                    tally.unmarked += 1
    finally:
        writer.close()


async def _load(
    port: int, seconds: float, connections: int, marked: bool, cpu: Callable[[], float]
) -> tuple[Tally, float, float]:
    """Answers counted over ``seconds`` (after the connections are open and busy), the span
    they took, and the server's CPU time over that span (``cpu``: its CPU seconds so far)."""
    tally = Tally()
    counting = [False]
    loop = asyncio.get_running_loop()
    warm = 0.3
    until = loop.time() + warm + seconds
    tasks = [
        asyncio.create_task(_connection(port, i, until, tally, marked, counting))
        for i in range(connections)
    ]
    await asyncio.sleep(warm)  # the benchmark's own clock: the span measured starts here
    counting[0] = True
    start, used = loop.time(), cpu()
    await asyncio.gather(*tasks)
    return tally, loop.time() - start, cpu() - used


def measure(
    server: Server, seconds: float, connections: int, marked: bool
) -> tuple[float, float, Tally]:
    """Answers per second, the server's CPU seconds per answer, and the answers' tally."""
    tally, span, used = asyncio.run(_load(server.port, seconds, connections, marked, server.cpu))
    return tally.ok / span, used / max(tally.ok, 1), tally


def _implementations(pairs: Sequence[tuple[str, str]]) -> str:
    import uvicorn

    measured = ", ".join(f"{http} + {loop}" for http, loop in pairs)
    note = "" if len(pairs) > 1 else "; httptools + uvloop (uvicorn[standard]) not installed"
    return f"uvicorn {uvicorn.__version__} (HTTP parser + event loop: {measured}{note})"


def _label(framework: str, stack: tuple[str, str]) -> str:
    return f"{TITLES[framework]} ({stack[0]}, {stack[1]})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--redis-url", help="run against this Redis (its db is FLUSHED)")
    parser.add_argument("--rounds", type=int, help="rounds per server (default 7, quick 3)")
    parser.add_argument("--seconds", type=float, help="length of a round (default 5, quick 2)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    pairs = stacks()
    began = time.monotonic()
    with redis_server(args.redis_url) as (url, how):
        import redis

        client = redis.Redis.from_url(url)
        version = client.info("server")["redis_version"]
        client.flushdb()
        print(
            f"Redis {version} ({how}); {_implementations(pairs)}; Python "
            f"{platform.python_version()}; {psutil.cpu_count()} CPUs"
        )
        with servers(url, pairs) as running:
            print(_pin(running, url))
            print(f"warm-up, then {rounds} rounds x {seconds:g} s per server ...", flush=True)
            for key, server in running.items():
                measure(server, 1.0, args.connections, key[2] != "bare")
            client.delete(QUEUE)
            rates: dict[Key, list[float]] = {key: [] for key in running}
            cpu: dict[Key, list[float]] = {key: [] for key in running}  # s per request
            failures: list[str] = []
            mine = {os.getpid(), *(s.proc.pid for s in running.values())}
            busy_before = _others_cpu(mine)
            wall_before = time.monotonic()
            for r in range(rounds):
                for framework in FRAMEWORKS:
                    for stack in pairs:
                        kinds = KINDS[framework]
                        for kind in kinds if r % 2 == 0 else reversed(kinds):
                            key = (framework, stack, kind)
                            server = running[key]
                            marked = kind != "bare"
                            rate, used, tally = measure(server, seconds, args.connections, marked)
                            rates[key].append(rate)
                            cpu[key].append(used)
                            client.delete(QUEUE)  # the tasks the round enqueued
                            name = f"{_label(framework, stack)} {key[2]}"
                            if tally.bad:
                                failures.append(f"{name}: answers other than 200: {tally.bad}")
                            if tally.unmarked:
                                failures.append(f"{name}: {tally.unmarked} answers without headers")
            other = (_others_cpu(mine) - busy_before) / (time.monotonic() - wall_before)
    rows = [
        ["app (HTTP parser, event loop)", "measure", "throttle", "bare", "ratio", "goal", "result"]
    ]
    ratios: dict[str, float] = {}
    floors: dict[str, float] = {}  # the floor's throughput / bare, per app that has one
    for framework in FRAMEWORKS:
        for stack in pairs:
            label = _label(framework, stack)
            bare_rates = rates[framework, stack, "bare"]
            throttled_rates = rates[framework, stack, "throttled"]
            bare, throttled = statistics.median(bare_rates), statistics.median(throttled_rates)
            ratio = ratios[label] = throttled / bare
            rows.append(
                [
                    label,
                    "requests/s, median (rounds' spread)",
                    f"{throttled:,.0f} ({_spread(throttled_rates)})",
                    f"{bare:,.0f} ({_spread(bare_rates)})",
                    f"{ratio:.2f}",
                    f">= {GOAL}",
                    verdict(ratio >= GOAL),
                ]
            )
            bare_us = statistics.median(cpu[framework, stack, "bare"]) * 1e6
            throttled_us = statistics.median(cpu[framework, stack, "throttled"]) * 1e6
            rows.append(
                [
                    label,
                    "server CPU per request, median",
                    f"{throttled_us:.0f} us",
                    f"{bare_us:.0f} us",
                    f"{bare_us / throttled_us:.2f}",
                    "",
                    "",
                ]
            )
            if "floor" in KINDS[framework]:
                floor_rates = rates[framework, stack, "floor"]
                floor = statistics.median(floor_rates)
                floors[label] = floor / bare
                floor_us = statistics.median(cpu[framework, stack, "floor"]) * 1e6
                rows.append(
                    [
                        label,
                        "floor of any check: requests/s",
                        f"{floor:,.0f} ({_spread(floor_rates)})",
                        f"{bare:,.0f} ({_spread(bare_rates)})",
                        f"{floor / bare:.2f}",
                        "",
                        "",
                    ]
                )
                rows.append(
                    [
                        label,
                        "floor of any check: server CPU per request",
                        f"{floor_us:.0f} us",
                        f"{bare_us:.0f} us",
                        f"{bare_us / floor_us:.2f}",
                        "",
                        "",
                    ]
                )
    print()
    print(
        f"Throughput through uvicorn, {args.connections} keep-alive connections, "
        f"{KEYS} API keys x {AGENTS} agents, 2 limits that never bind:"
    )
    print(table(rows, args.markdown, [False, False, True, True, True, False, False]))
    print(f"(other load {other:.2f} CPUs)")
    print()
    for problem in failures:
        print(f"FAILED CHECK: {problem}")
    for label, ratio in ratios.items():
        print(f"{label}: throttled / bare {ratio:.2f} (goal >= {GOAL}): {verdict(ratio >= GOAL)}")
    for label, ratio in floors.items():
        print(f"{label}: floor of any check / bare {ratio:.2f} (no goal: the best a check can do)")
    print(f"total time {time.monotonic() - began:.0f} s")
    return 1 if failures else 0


def _pin(running: dict[Key, Server], url: str) -> str:
    """Give the servers a CPU of their own, and this process (the load) and a local Redis the
    others: each server's throughput is then what one core gives it, whatever the scheduler
    would have made of three busy processes on few cores."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return "CPUs: not pinned (fewer than 2)"
    serving, rest = {cpus[-1]}, set(cpus[:-1])
    for server in running.values():
        os.sched_setaffinity(server.proc.pid, serving)
    os.sched_setaffinity(0, rest)
    port = url.rsplit(":", 1)[1].split("/")[0]
    pinned = "the load"
    for proc in psutil.process_iter(["name", "cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "redis-server" and f":{port}" in command:
            os.sched_setaffinity(proc.pid, rest)
            pinned = "the load and Redis"
            # Redis answers as soon as it has work rather than after the load's time slice,
            # as it would on a core (or a machine) of its own. Needs the right to raise a
            # priority (root, or CAP_SYS_NICE); without it Redis keeps its share.
            try:
                os.setpriority(os.PRIO_PROCESS, proc.pid, -10)
                pinned += " (Redis first)"
            except PermissionError:
                pass
    return f"CPUs: each server on CPU {cpus[-1]}, {pinned} on CPU {min(rest)}-{max(rest)}"


def _spread(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def _others_cpu(mine: set[int]) -> float:
    """CPU seconds used so far by every process on the machine but ours and Redis's (a
    process that starts or ends meanwhile makes this approximate)."""
    total = 0.0
    for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
        if proc.info["pid"] in mine or proc.info["cpu_times"] is None:
            continue
        if proc.info["name"] == "redis-server":
            continue
        total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


if __name__ == "__main__":
    sys.exit(main())
