# SPDX-License-Identifier: MIT
"""What the Celery gate costs and how it holds a limit, with real ``celery worker`` processes.

Run from the repository root: ``python benchmarks/gate.py`` (``make bench-gate``); ``--quick``
scales every part down, ``--markdown`` prints the table as Markdown. Everything runs against one
Redis server: a private ``redis-server`` started for the run (``tests.redis_servers``) unless
``--redis-url`` is given (its dbs 0, 1 and 2 are then FLUSHED). Store, broker and results live
in dbs 0, 1 and 2 of that server. Workers are ``celery -A benchmarks.gateapp worker -P prefork
-c 2`` subprocesses, log level WARNING (no per-task log lines), no events, prefetch multiplier 4;
every part starts fresh workers on an emptied server, and all of them are stopped (then killed
if need be) at the end, on an exception and on Ctrl-C.

What is measured
    1. Overhead. ONE worker (2 slots) runs the same no-op task with a limit that never binds
       (``1000000/s``, burst 1000000, per API key) and without any limit: two task names, one
       worker, one configuration. Batches alternate (gated, ungated, then ungated, gated, ...)
       over several rounds after an untimed warm-up batch of each (alternating batches rather
       than one mixed queue, so each timed span belongs to one kind, and drift in the machine's
       load hits both kinds alike). Each batch is published in
       full to a queue the worker is not consuming; the worker is then told to consume it
       (``add_consumer``) and, once every result is stored, to stop (``cancel_consumer``). A
       batch's throughput is (tasks - 1) / (last ``date_done`` - first ``date_done``) from the
       result backend: the worker's own pace on a full queue, free of the client's publishing
       speed and of the broker's up-to-1-second poll before a new queue is read. A kind's
       throughput is its tasks over its summed spans; the goal is gated / ungated >= 0.9.
       The machine has few cores and the worker, its pool and Redis share them, so other work
       on the machine moves these numbers: the row shows the rounds' spread and how many CPUs
       other processes kept busy meanwhile ("other load", from psutil).
    2. Against Celery's ``rate_limit``. 3 workers x 2 slots, 300 tasks of one API key sent at
       once: first a task throttled at 1/s burst 10 per API key, then (fresh workers, emptied
       Redis) a task with ``rate_limit="60/m"``, which Celery applies per worker. Each task
       records its start (wall time) in Redis. The run stops ``window`` seconds after the first
       start (plus a short grace for the last records), counts the starts in [first, first +
       window), purges the queue and stops the workers: the remaining booked work is not waited
       for. Re-denials: deferrals whose copy came back holding a booking and was deferred again
       (``rebooked`` of ``throttle.signals.task_throttled``), divided by the admissions so far.
       Failures: results with status FAILURE in the result backend. Held: every second,
       ``celery inspect scheduled`` per worker (deferred copies wait there as countdown
       messages); the peak count in any one worker. Celery's rate limit holds its waiting tasks
       in a bucket that ``inspect scheduled`` does not list, so the peak of that bucket is shown
       too (the ``bench_held`` inspect command of ``benchmarks/gateapp.py``).
    3. Backlog. 10,000 tasks of one API key against 50/s burst 50, 3 workers x 2 slots, until
       all have started. Re-publishes per admitted task: deferrals counted by the signal in the
       worker processes, divided by task starts. Peak RSS: every second, per worker the sum of
       the main process and its pool children (psutil), the largest sum of any worker (and its
       idle value before the backlog was sent). Duplicates: task starts recorded beyond one per
       task id. Also: peak deferred copies held in one worker, and the admitted rate.

How to read it
    One row per measurement: ``throttle`` is ours, ``other`` the comparison (the ungated no-op
    in part 1, Celery's ``rate_limit`` in part 2), then the goal and PASS or FAIL where the
    performance issue sets one (plus a check that every backlog task ran). The goals are
    repeated at the end, then the total run time.
    With ``--quick``: 5 x 200 tasks of each kind, a 30 s window, 2,000 backlog tasks; the
    window goal scales with it (burst + window - 4 to burst + window starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import celery
import psutil
import redis
from _common import Workers, redis_server, table, verdict  # beside this script

APP = "benchmarks.gateapp"
PREFIX = "bench"
API_KEY = "tenant-1"
#: The worker in part 1 idles on this queue; batches are published to BATCH_QUEUE.
IDLE_QUEUE = "bench.idle"
BATCH_QUEUE = "bench.batch"
OPEN_LIMIT: dict[str, Any] = {"rate": "1000000/s", "burst": 1000000}

# Goals from the issue.
GOAL_OVERHEAD = 0.9
GOAL_REDENIALS = 0.05
COMPARE_TASKS = 300
COMPARE_LIMIT: dict[str, Any] = {"rate": "1/s", "burst": 10}
BACKLOG_LIMIT: dict[str, Any] = {"rate": "50/s", "burst": 50}
GRACE = 2.0  # seconds after the window for the last starts to be recorded


@dataclass(frozen=True)
class Settings:
    batch: int  # no-op tasks per batch in part 1
    rounds: int  # rounds of part 1 (one gated and one ungated batch each)
    warmup: int  # untimed tasks of each kind before the rounds
    window: float  # seconds counted in part 2
    backlog: int  # tasks in part 3


FULL = Settings(batch=1_000, rounds=5, warmup=300, window=60.0, backlog=10_000)
QUICK = Settings(batch=200, rounds=5, warmup=100, window=30.0, backlog=2_000)


@dataclass(frozen=True)
class Urls:
    store: str
    broker: str
    backend: str

    @classmethod
    def on(cls, url: str) -> Urls:
        """Dbs 0, 1 and 2 of the server at ``url``."""
        parts = urlsplit(url)
        return cls(*(urlunsplit(parts._replace(path=f"/{db}")) for db in (0, 1, 2)))


def gate_workers(urls: Urls, conf: dict[str, Any], logdir: Path, tag: str) -> Workers:
    """Workers of ``benchmarks.gateapp`` with one configuration."""
    env = {
        "GATE_BENCH_BROKER": urls.broker,
        "GATE_BENCH_BACKEND": urls.backend,
        "GATE_BENCH_STORE": urls.store,
        "GATE_BENCH_CONF": json.dumps(conf),
        "GATE_BENCH_PREFIX": PREFIX,
    }
    return Workers(APP, env, urls.broker, logdir, tag)


def send(
    workers: Workers, task: str, count: int, *, queue: str | None = None, first: int = 0
) -> None:
    """Publish ``count`` calls of ``task`` for one API key over one producer connection."""
    options: dict[str, Any] = {} if queue is None else {"queue": queue}
    with workers.client.producer_or_acquire() as producer:
        for i in range(first, first + count):
            workers.client.send_task(task, (i,), {"api_key": API_KEY}, producer=producer, **options)


# -- reading the record ----------------------------------------------------------------------


def starts(store: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(x) for x in store.lrange(f"{PREFIX}:starts", 0, -1)]


def deferral_counts(store: redis.Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = store.hgetall(f"{PREFIX}:deferrals")  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


def results(backend: redis.Redis) -> list[dict[str, Any]]:
    """Every task result stored in the result backend's db."""
    keys = list(backend.scan_iter(match="celery-task-meta-*", count=1000))
    out = []
    for i in range(0, len(keys), 1000):
        out += [json.loads(v) for v in backend.mget(keys[i : i + 1000]) if v is not None]
    return out


def duplicates(record: list[dict[str, Any]]) -> int:
    """Starts beyond the first of each task id."""
    return sum(n - 1 for n in Counter(s["id"] for s in record).values())


# -- part 1: overhead ---------------------------------------------------------------------------


@dataclass
class Overhead:
    tasks: dict[str, int] = field(default_factory=lambda: {"gated": 0, "ungated": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"gated": 0.0, "ungated": 0.0})
    ratios: list[float] = field(default_factory=list)  # per round, gated / ungated
    foreign: float = 0.0  # CPUs busy with processes not of this run, during the rounds

    def rate(self, kind: str) -> float:
        return self.tasks[kind] / self.seconds[kind]

    @property
    def ratio(self) -> float:
        return self.rate("gated") / self.rate("ungated")


def run_batch(workers: Workers, backend: redis.Redis, task: str, count: int) -> float:
    """One batch on a full queue; returns the span from the first to the last ``date_done``."""
    backend.flushdb()
    send(workers, task, count, queue=BATCH_QUEUE)
    workers.control("add_consumer", queue=BATCH_QUEUE, exchange=BATCH_QUEUE)
    deadline = time.monotonic() + 60 + count / 50
    while backend.dbsize() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{task}: {backend.dbsize()} of {count} results after the deadline")
        time.sleep(0.01)
    workers.control("cancel_consumer", queue=BATCH_QUEUE)
    done = [datetime.fromisoformat(r["date_done"]).timestamp() for r in results(backend)]
    if len(done) != count:
        raise RuntimeError(f"{task}: {len(done)} results for {count} tasks")
    return max(done) - min(done)


def measure_overhead(urls: Urls, settings: Settings, logdir: Path) -> Overhead:
    store, backend = redis.Redis.from_url(urls.store), redis.Redis.from_url(urls.backend)
    store.flushall()
    names = {"gated": "gateapp.noop_gated", "ungated": "gateapp.noop"}
    out = Overhead()
    with gate_workers(urls, {}, logdir, "overhead") as workers:
        workers.start(1, queue=IDLE_QUEUE)
        for kind in ("gated", "ungated"):
            run_batch(workers, backend, names[kind], settings.warmup)
        cpu = CpuShare()
        for rnd in range(settings.rounds):
            order = ("gated", "ungated") if rnd % 2 == 0 else ("ungated", "gated")
            rates = {}
            for kind in order:
                span = run_batch(workers, backend, names[kind], settings.batch)
                out.tasks[kind] += settings.batch - 1
                out.seconds[kind] += span
                rates[kind] = (settings.batch - 1) / span
            out.ratios.append(rates["gated"] / rates["ungated"])
            print(
                f"  round {rnd + 1}: gated {rates['gated']:,.0f}/s, "
                f"ungated {rates['ungated']:,.0f}/s",
                flush=True,
            )
        out.foreign = cpu.foreign()
    return out


class CpuShare:
    """How busy the machine was with processes other than this one and its children (the
    workers, the private redis-server): other work makes the overhead rounds noisy."""

    def __init__(self) -> None:
        self.wall = time.monotonic()
        self.busy = self._busy()
        self.ours = self._ours()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _ours() -> dict[int, float]:
        me = psutil.Process()
        out = {}
        for process in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = process.cpu_times()
                out[process.pid] = t.user + t.system
        return out

    def foreign(self) -> float:
        """CPUs used by other processes since this object was made (0 to the CPU count)."""
        ours = self._ours()
        spent = sum(v - self.ours.get(pid, 0.0) for pid, v in ours.items())
        other = self._busy() - self.busy - spent
        return max(0.0, other / (time.monotonic() - self.wall))


# -- part 2: against Celery's rate_limit ----------------------------------------------------


@dataclass
class Window:
    started: int  # task starts in [first start, first start + window)
    admissions: int  # task starts recorded when the run stopped
    deferrals: int
    rebooked: int
    failures: int
    duplicates: int
    peak_scheduled: int  # most countdown/ETA requests one worker held (inspect scheduled)
    peak_bucket: int  # most requests one worker held in Celery's rate-limit buckets

    @property
    def redenials(self) -> float:
        return self.rebooked / max(1, self.admissions)


def measure_window(urls: Urls, settings: Settings, logdir: Path, task: str) -> Window:
    store, backend = redis.Redis.from_url(urls.store), redis.Redis.from_url(urls.backend)
    store.flushall()
    conf = {"throttle_limits": {"open": OPEN_LIMIT, "bench": COMPARE_LIMIT}}
    tag = task.split(".")[-1]
    peak_scheduled = peak_bucket = 0
    with gate_workers(urls, conf, logdir, f"w{tag}") as workers:
        workers.start(3)
        send(workers, f"gateapp.{task}", COMPARE_TASKS)
        first: float | None = None
        give_up = time.monotonic() + 60
        while True:
            tick = time.monotonic()
            peak_scheduled = max(peak_scheduled, *workers.scheduled().values(), 0)
            held = workers.control("bench_held")
            peak_bucket = max(peak_bucket, *(h["bucket"] for h in held.values()), 0)
            if first is None:
                head = store.lindex(f"{PREFIX}:starts", 0)
                if head is not None:
                    first = min(s["t"] for s in starts(store))
                elif tick > give_up:
                    raise RuntimeError(f"no {task} task started within 60 s")
            if first is not None and time.time() >= first + settings.window + GRACE:
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        record = starts(store)
        counts = deferral_counts(store)
        workers.client.control.purge()
    first = min(s["t"] for s in record)
    return Window(
        started=sum(1 for s in record if s["t"] < first + settings.window),
        admissions=len(record),
        deferrals=counts.get("deferrals", 0),
        rebooked=counts.get("rebooked", 0),
        failures=sum(1 for r in results(backend) if r.get("status") == "FAILURE"),
        duplicates=duplicates(record),
        peak_scheduled=peak_scheduled,
        peak_bucket=peak_bucket,
    )


# -- part 3: backlog ----------------------------------------------------------------------------


@dataclass
class Backlog:
    tasks: int
    started: int  # distinct task ids that started
    admissions: int  # task starts
    deferrals: int
    rebooked: int
    duplicates: int
    failures: int
    peak_rss: int  # bytes, the largest per-worker sum seen
    idle_rss: int  # bytes, the largest per-worker sum before sending
    peak_scheduled: int
    rate: float  # admitted per second after the burst
    seconds: float  # from the first send to the last start


def measure_backlog(urls: Urls, settings: Settings, logdir: Path) -> Backlog:
    store, backend = redis.Redis.from_url(urls.store), redis.Redis.from_url(urls.backend)
    store.flushall()
    conf = {"throttle_limits": {"open": OPEN_LIMIT, "bench": BACKLOG_LIMIT}}
    count = settings.backlog
    with gate_workers(urls, conf, logdir, "backlog") as workers:
        workers.start(3)
        idle_rss = max(workers.rss().values())
        peak_rss, peak_scheduled = idle_rss, 0
        began = time.time()
        send(workers, "gateapp.ours", count)
        deadline = time.monotonic() + count / 50 + 180
        while True:
            tick = time.monotonic()
            peak_rss = max(peak_rss, *workers.rss().values())
            held = workers.control("bench_held")
            peak_scheduled = max(peak_scheduled, *(h["scheduled"] for h in held.values()), 0)
            done = store.llen(f"{PREFIX}:starts")
            if done >= count:
                break
            if tick > deadline:
                print(f"  gave up waiting: {done:,} of {count:,} started", flush=True)
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        time.sleep(1.0)  # late duplicates, if any, would show up here
        record = starts(store)
        counts = deferral_counts(store)
        failures = sum(1 for r in results(backend) if r.get("status") == "FAILURE")
    times = sorted(s["t"] for s in record)
    burst = int(BACKLOG_LIMIT["burst"])
    rate = (len(times) - burst) / (times[-1] - times[burst - 1]) if len(times) > burst else 0.0
    return Backlog(
        tasks=count,
        started=len({s["id"] for s in record}),
        admissions=len(record),
        deferrals=counts.get("deferrals", 0),
        rebooked=counts.get("rebooked", 0),
        duplicates=duplicates(record),
        failures=failures,
        peak_rss=peak_rss,
        idle_rss=idle_rss,
        peak_scheduled=peak_scheduled,
        rate=rate,
        seconds=(times[-1] - began) if times else 0.0,
    )


# -- output -----------------------------------------------------------------------------------


COLUMNS_RIGHT = [False, False, True, True, False, False]


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(
    overhead: Overhead,
    ours: Window,
    builtin: Window,
    backlog: Backlog,
    settings: Settings,
    markdown: bool,
) -> None:
    window = f"{settings.window:.0f} s"
    burst, per_s = int(COMPARE_LIMIT["burst"]), 1
    most = burst + round(settings.window) * per_s
    least = most - 4
    goals: list[tuple[bool, str]] = [
        (
            overhead.ratio >= GOAL_OVERHEAD,
            f"overhead: gated / ungated throughput >= {GOAL_OVERHEAD}: {overhead.ratio:.2f}",
        ),
        (
            least <= ours.started <= most,
            f"{least} to {most} starts in the first {window} at 1/s burst {burst}: {ours.started}",
        ),
        (
            ours.redenials <= GOAL_REDENIALS,
            f"re-denials per admission <= {GOAL_REDENIALS}: {ours.redenials:.3f}",
        ),
        (ours.failures == 0, f"no failures (1/s burst {burst}): {ours.failures}"),
        (backlog.duplicates == 0, f"no duplicate runs in the backlog: {backlog.duplicates}"),
        (
            backlog.started == backlog.tasks,
            f"every backlog task ran: {backlog.started:,} of {backlog.tasks:,}",
        ),
    ]
    ok = [verdict(g) for g, _ in goals]
    spread = f"{min(overhead.ratios):.2f}-{max(overhead.ratios):.2f}"
    rows = [
        ["part", "measure", "throttle", "other", "goal", "result"],
        [
            "1 overhead",
            "no-op tasks/s, 1 worker x 2 (gated; other: ungated)",
            f"{overhead.rate('gated'):,.0f}",
            f"{overhead.rate('ungated'):,.0f}",
            "",
            "",
        ],
        [
            "1 overhead",
            f"gated / ungated (rounds {spread}; other load {overhead.foreign:.2f} CPUs)",
            f"{overhead.ratio:.2f}",
            "",
            f">= {GOAL_OVERHEAD}",
            ok[0],
        ],
        [
            "2 vs rate_limit",
            f"starts in first {window} (1/s burst {burst}; other: rate_limit 60/m)",
            f"{ours.started}",
            f"{builtin.started}",
            f"{least}-{most}",
            ok[1],
        ],
        [
            "2 vs rate_limit",
            "re-denials per admission (rebooked / starts)",
            f"{ours.redenials:.3f} ({ours.rebooked}/{ours.admissions})",
            "",
            f"<= {GOAL_REDENIALS}",
            ok[2],
        ],
        [
            "2 vs rate_limit",
            "deferrals (task_throttled)",
            f"{ours.deferrals}",
            "",
            "",
            "",
        ],
        ["2 vs rate_limit", "failures", f"{ours.failures}", f"{builtin.failures}", "0", ok[3]],
        [
            "2 vs rate_limit",
            "peak held in one worker: inspect scheduled",
            f"{ours.peak_scheduled}",
            f"{builtin.peak_scheduled}",
            "",
            "",
        ],
        [
            "2 vs rate_limit",
            "peak held in one worker: rate_limit bucket",
            f"{ours.peak_bucket}",
            f"{builtin.peak_bucket}",
            "",
            "",
        ],
        [
            "3 backlog",
            f"{backlog.tasks:,} tasks at 50/s b50, 3 workers x 2: re-publishes per admission",
            f"{backlog.deferrals / max(1, backlog.admissions):.3f}",
            "",
            "",
            "",
        ],
        [
            "3 backlog",
            "re-denials (rebooked)",
            f"{backlog.rebooked}",
            "",
            "",
            "",
        ],
        [
            "3 backlog",
            "peak worker RSS, main + children (idle before)",
            mib(backlog.peak_rss),
            f"({mib(backlog.idle_rss)})",
            "",
            "",
        ],
        [
            "3 backlog",
            "peak held in one worker: scheduled",
            f"{backlog.peak_scheduled:,}",
            "",
            "",
            "",
        ],
        [
            "3 backlog",
            "admitted/s after the burst; s from send to last start",
            f"{backlog.rate:.1f}",
            f"{backlog.seconds:.0f} s",
            "",
            "",
        ],
        ["3 backlog", "duplicate runs", f"{backlog.duplicates}", "", "0", ok[4]],
        ["3 backlog", "failures", f"{backlog.failures}", "", "", ""],
        [
            "3 backlog",
            "tasks that ran",
            f"{backlog.started:,}",
            "",
            f"{backlog.tasks:,}",
            ok[5],
        ],
    ]
    print()
    print(table(rows, markdown, COLUMNS_RIGHT))
    print()
    print("Goals:")
    for good, text in goals:
        print(f"  {verdict(good)}  {text}")


# -- running it -------------------------------------------------------------------------------


_INTERRUPTED = False


def _interrupt(signum: int, _frame: Any) -> None:
    """SIGINT and SIGTERM unwind through the cleanup (workers killed, redis-server stopped).
    Ctrl-C also reaches the private redis-server, so what fails next is part of the interrupt."""
    global _INTERRUPTED
    _INTERRUPTED = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast run: every part smaller")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--redis-url", help="run against this server instead (ITS DBS 0, 1 AND 2 ARE FLUSHED)"
    )
    parser.add_argument("--logdir", type=Path, help="keep the worker logs here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.logdir:
            args.logdir.mkdir(parents=True, exist_ok=True)
            logdir = args.logdir
        else:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gate-")))
        url, where = stack.enter_context(redis_server(args.redis_url))
        client = redis.Redis.from_url(url)
        info = client.info("server")
        print(
            f"Redis {info['redis_version']} ({where}, {url}); Python "
            f"{platform.python_version()}, Celery {celery.__version__}, redis-py "
            f"{redis.__version__}; {multiprocessing.cpu_count()} CPUs",
            flush=True,
        )
        urls = Urls.on(url)
        marks = {}
        print(
            f"1. overhead: {settings.rounds} rounds x {settings.batch:,} tasks of each kind ...",
            flush=True,
        )
        overhead = measure_overhead(urls, settings, logdir)
        marks["overhead"] = time.perf_counter()
        print(f"2. throttle 1/s burst 10: {settings.window:.0f} s window ...", flush=True)
        ours = measure_window(urls, settings, logdir, "ours")
        print(f"2. Celery rate_limit 60/m: {settings.window:.0f} s window ...", flush=True)
        builtin = measure_window(urls, settings, logdir, "builtin")
        marks["window"] = time.perf_counter()
        print(f"3. backlog: {settings.backlog:,} tasks at 50/s ...", flush=True)
        backlog = measure_backlog(urls, settings, logdir)
        marks["backlog"] = time.perf_counter()
        for db in (urls.store, urls.broker, urls.backend):
            redis.Redis.from_url(db).flushdb()
        report(overhead, ours, builtin, backlog, settings, args.markdown)
    total = time.perf_counter() - began
    print()
    print(
        f"total time {total:.0f} s (overhead {marks['overhead'] - began:.0f} s, windows "
        f"{marks['window'] - marks['overhead']:.0f} s, backlog "
        f"{marks['backlog'] - marks['window']:.0f} s)"
    )


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:
        if _INTERRUPTED or isinstance(exc, KeyboardInterrupt):
            print("\ninterrupted: workers killed, redis-server stopped", file=sys.stderr)
            sys.exit(130)
        raise
