# SPDX-License-Identifier: MIT
"""Soak: minutes of mixed traffic through three ``celery worker`` processes while the store's
Redis and the workers are killed and restarted, with what came of every task at the end.

Run from the repository root: ``python benchmarks/soak.py`` (``make bench-soak``, 10 minutes);
``--quick`` runs one minute, ``--minutes N`` any length. Broker and the tasks' record live on a
private ``redis-server`` started for the run (or ``--redis-url``: its dbs 1 and 3 are FLUSHED;
``--broker amqp://...`` puts the broker on RabbitMQ, in a queue of the run's own); the store is
always a private ``redis-server`` of its own, since the run kills it.

Traffic (seeded): an even background of calls from 200 API keys x 10 agents, and, every 10 s on
average, a hot key sending three times its key's limit for 5 s or a runaway agent sending three
times its agent's limit for 10 s. Limits: 20/s burst 20 per API key, 5/s burst 5 per agent.
The task (``soak.call``, ``acks_late``) records each run: the task, the time, the copy (its
deferral token) and whether the broker delivered that message before.

Faults: every ``--worker-kill-every`` seconds a random worker is SIGKILLed with its pool (and a
new one started at once); every ``--store-kill-every`` seconds the store is SIGKILLed and
started again, empty, ``--outage`` seconds later. The workers run with a 30 s visibility
timeout, so the copies a dead worker held come back within the run, and with deferral guards
and traffic counts kept 60 s and 120 s, so the store's memory should level off within it
(the defaults keep both for an hour).

At the end the traffic stops, every task is waited for (at most ``DRAIN`` seconds), and it
prints, per interval, what was sent, run and deferred, the most messages seen waiting in the
broker's queue, the store's ``used_memory`` (peak in the interval) and key count; then tasks
completed, lost (never ran), duplicated (ran as two copies, or ran again without a
redelivery), re-runs of one copy after a kill (Celery's at-least-once for ``acks_late``), and
limit violations: episodes in which a key or an agent was admitted more than burst + rate
times within 1 s (on the store's clock; a run admitted in-process counts from its start),
split into those around a store outage (which loses every bucket) and the rest, each of the
rest with the fault before it. For the first lost or duplicated tasks it prints their
deferrals and runs among the faults.

On a Redis broker a SIGKILLed worker can take with it a message it had just taken off the
queue (kombu records it as unacknowledged in a second command): such tasks show as lost with
no deferral or run. ``--broker`` on RabbitMQ shows what throttle itself loses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import celery
import redis
from celery import Celery
from celery.signals import celeryd_after_setup
from kombu import Connection

import throttle
from throttle import signals

try:  # run as a script: this directory is on sys.path
    from _common import ROOT, Workers, redis_server, table
except ModuleNotFoundError:  # imported by ``celery -A benchmarks.soak worker``
    from benchmarks._common import ROOT, Workers, redis_server, table

APP = "benchmarks.soak"
SECRET = "soak-benchmark-secret-0123456789"
KEYS, AGENTS = 200, 10
KEY_RATE, KEY_BURST = 20, 20
AGENT_RATE, AGENT_BURST = 5, 5
BACKGROUND = 100.0  # calls per second, spread over every key and agent
EPISODE_EVERY = 10.0  # seconds between hot keys (and between runaway agents), on average
VISIBILITY = 30  # seconds: a dead worker's messages come back after this
MAX_DEFER = 10
GUARD_TTL = 60
RETENTION = 120
#: How long the run waits at the end for the last tasks (a dead worker's copies included).
DRAIN = 120.0
#: Violations this close to a store outage are put down to it (the restarted store has no
#: buckets: every key may take its burst again).
OUTAGE_SETTLE = 5.0
RUNS, STARTED, DEFERRALS = "soak:runs", "soak:started", "soak:deferrals"
#: One entry per deferral: [task id, wall time, reason, limit, countdown, worker].
DEFERRAL_LOG = "soak:deferral-log"
CONF: dict[str, Any] = {
    "throttle_key_secret": SECRET,
    "throttle_limits": {
        "per-key": {"rate": f"{KEY_RATE}/s", "burst": KEY_BURST},
        "per-agent": {
            "rate": f"{AGENT_RATE}/s",
            "burst": AGENT_BURST,
            "per": ["api_key", "agent_id"],
        },
    },
    # The sampler runs, but the machine's load (it is busy by design) tightens nothing.
    "throttle_adaptive": {"cpu": [], "memory": []},
    "throttle_max_defer": MAX_DEFER,
    "throttle_guard_ttl": GUARD_TTL,
    "throttle_counts_retention": RETENTION,
    "broker_transport_options": {
        "visibility_timeout": VISIBILITY,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    "broker_connection_retry_on_startup": True,
    "task_ignore_result": True,
    "worker_prefetch_multiplier": 4,
}


# -- the workers' app (``celery -A benchmarks.soak worker``, configured from the environment) --


def _worker_app() -> Celery:
    app = Celery("soak", broker=os.environ["SOAK_BROKER"])
    app.conf.update(json.loads(os.environ["SOAK_CONF"]))
    throttle.Throttle(app)
    record = redis.Redis.from_url(os.environ["SOAK_RECORD"])  # its pool reconnects after fork
    node = [""]  # this worker's node name, once it is known

    @celeryd_after_setup.connect(weak=False)
    def named(sender: Any = None, **_: Any) -> None:
        node[0] = str(sender)

    @app.task(bind=True, acks_late=True, throttle=["per-key", "per-agent"], name="soak.call")
    def call(self: Any, i: int, *, api_key: str, agent_id: str) -> None:
        request = self.request
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        token = getattr(request, "throttle_token", None)
        pipe = record.pipeline(transaction=False)
        # When the store admitted it (its clock; None: in-process buckets while it was away):
        # limits are about admissions, and a busy pool process starts runs late, in bunches.
        admitted = getattr(request, "throttle_admitted", None) or {}
        entry = [i, time.time(), token, redelivered, request.hostname, admitted.get("at")]
        pipe.rpush(RUNS, json.dumps(entry))
        pipe.rpush(STARTED, i)
        pipe.execute()

    @signals.task_throttled.connect(weak=False)
    def deferred(sender: Any = None, **fields: Any) -> None:
        pipe = record.pipeline(transaction=False)
        pipe.hincrby(DEFERRALS, str(fields.get("reason")))
        entry = [fields.get("task_id"), time.time(), fields.get("reason"), fields.get("limit")]
        pipe.rpush(DEFERRAL_LOG, json.dumps([*entry, fields.get("countdown"), node[0]]))
        pipe.execute()

    return app


if os.environ.get("SOAK_CONF"):
    app = _worker_app()


# -- traffic -----------------------------------------------------------------------------------


def schedule(seconds: float, seed: int) -> list[tuple[float, str, str]]:
    """(offset in seconds, api_key, agent_id) of every call, in order."""
    rng = random.Random(seed)
    keys = [f"key{k:03d}" for k in range(KEYS)]
    agents = [f"agent{a}" for a in range(AGENTS)]
    calls: list[tuple[float, str, str]] = []
    t = rng.expovariate(BACKGROUND)
    while t < seconds:
        calls.append((t, rng.choice(keys), rng.choice(agents)))
        t += rng.expovariate(BACKGROUND)
    # Hot keys: 5 s at three times the key's limit, over all of its agents.
    t = rng.expovariate(1 / EPISODE_EVERY)
    while t < seconds:
        key = rng.choice(keys)
        calls += [(t + rng.uniform(0, 5), key, rng.choice(agents)) for _ in range(3 * KEY_RATE * 5)]
        t += rng.expovariate(1 / EPISODE_EVERY)
    # Runaway agents: 10 s at three times the agent's limit.
    t = rng.expovariate(1 / EPISODE_EVERY)
    while t < seconds:
        key, agent = rng.choice(keys), rng.choice(agents)
        calls += [(t + rng.uniform(0, 10), key, agent) for _ in range(3 * AGENT_RATE * 10)]
        t += rng.expovariate(1 / EPISODE_EVERY)
    return sorted(c for c in calls if c[0] < seconds)


class Producer(threading.Thread):
    """Sends the schedule as it falls due; ``plan[i]`` is the (api_key, agent_id) of call i."""

    def __init__(self, broker: str, queue: str, calls: list[tuple[float, str, str]]) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.calls = calls
        self.plan: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.client = Celery("soak-producer", broker=broker, set_as_current=False)
        self.client.conf.update(
            broker_connection_retry_on_startup=True,
            task_ignore_result=True,
            task_default_queue=queue,
        )
        self.error: BaseException | None = None

    def run(self) -> None:
        start = time.monotonic()
        try:
            for offset, api_key, agent_id in self.calls:
                # The traffic's own pace: a call is sent when it falls due.
                if self.stop.wait(max(0.0, start + offset - time.monotonic())):
                    return
                i = len(self.plan)
                self.plan.append((api_key, agent_id))
                kwargs = {"api_key": api_key, "agent_id": agent_id}
                self.client.send_task("soak.call", (i,), kwargs, task_id=f"soak-{i}")
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.client.close()


# -- faults ------------------------------------------------------------------------------------


@dataclass
class Faults:
    """The workers (three slots, each a ``Workers`` of one process) and the store, and what
    was done to them when (wall time)."""

    env: dict[str, str]
    broker: str
    logdir: Path
    store: Any  # tests.redis_servers.RedisServer
    rng: random.Random
    slots: list[Workers] = field(default_factory=list)
    started: int = 0
    log: list[tuple[float, str]] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)
    error: BaseException | None = None

    def start_worker(self) -> Workers:
        workers = Workers(APP, self.env, self.broker, self.logdir, f"soak{self.started}-")
        self.started += 1
        workers.start(1, concurrency=2)
        return workers

    def kill_worker(self) -> None:
        slot = self.rng.randrange(len(self.slots))
        node = self.slots[slot].nodes[0].split("@")[0]
        self.log.append((time.time(), f"worker {node} killed"))
        self.slots[slot].kill()
        self.slots[slot] = self.start_worker()

    def kill_store(self, outage: float, stop: threading.Event) -> None:
        killed = time.time()
        self.log.append((killed, f"store killed for {outage:g} s"))
        self.store.kill()
        stop.wait(outage)  # the outage's length is the fault itself
        self.store.start()
        self.outages.append((killed, time.time()))

    def run(
        self,
        seconds: float,
        worker_every: float,
        store_every: float,
        outage: float,
        stop: threading.Event,
    ) -> None:
        """Kill in turn until ``seconds`` have passed or ``stop`` is set."""
        try:
            self._run(seconds, worker_every, store_every, outage, stop)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _run(
        self,
        seconds: float,
        worker_every: float,
        store_every: float,
        outage: float,
        stop: threading.Event,
    ) -> None:
        began = time.monotonic()
        plan = sorted(
            [(t, "worker") for t in _every(worker_every, seconds)]
            + [(t, "store") for t in _every(store_every, seconds - outage)]
        )
        for at, what in plan:
            if stop.wait(max(0.0, began + at - time.monotonic())):
                return
            if what == "worker":
                self.kill_worker()
            else:
                self.kill_store(outage, stop)


def _every(period: float, seconds: float) -> list[float]:
    """Moments ``period`` apart, the first half a period in, all before ``seconds``."""
    times, t = [], period / 2
    while t < seconds:
        times.append(t)
        t += period
    return times


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One interval of the run."""

    end: float  # seconds since the start
    sent: int = 0
    ran: int = 0
    deferred: int = 0
    memory: int | None = None  # peak used_memory of the store in the interval (None: down)
    queue: int = 0  # the most messages seen waiting in the broker's queue
    keys: int | None = None  # the store's key count at the end of the interval
    events: list[str] = field(default_factory=list)


def store_state(store: Any) -> tuple[int, int] | None:
    """The store's used_memory and key count, or None while it is down."""
    try:
        client = store.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        with contextlib.closing(client):
            return int(client.info("memory")["used_memory"]), int(client.dbsize())
    except (redis.ConnectionError, redis.TimeoutError, RuntimeError):
        return None


def run(args: argparse.Namespace, url: str, where: str, logdir: Path) -> None:
    from tests.redis_servers import RedisServer  # here: main() put the root on the path

    seconds = args.minutes * 60
    step = max(10.0, seconds / 10)
    base = urlsplit(url)
    broker = args.broker or urlunsplit(base._replace(path="/1"))
    queue = f"soak-{os.getpid()}"  # of this run only (a shared RabbitMQ keeps queues)
    record = redis.Redis.from_url(urlunsplit(base._replace(path="/3")))
    if not args.broker:
        redis.Redis.from_url(broker).flushdb()
    record.flushdb()
    began = time.monotonic()
    with RedisServer() as store, contextlib.ExitStack() as stack:
        env = {
            "SOAK_BROKER": broker,
            "SOAK_RECORD": urlunsplit(base._replace(path="/3")),
            "SOAK_CONF": json.dumps(
                {**CONF, "throttle_redis_url": store.url, "task_default_queue": queue}
            ),
        }
        faults = Faults(env, broker, logdir, store, random.Random(args.seed))
        info = record.info("server")
        shared = "record" if args.broker else "broker and record"
        print(
            f"Redis {info['redis_version']} ({shared}: {where}, {url}; store: private"
            f" redis-server {store.url}); Python {platform.python_version()}, Celery"
            f" {celery.__version__}, redis-py {redis.__version__}; {os.cpu_count()} CPUs",
            flush=True,
        )
        if args.broker:
            print(f"broker: {args.broker}, queue {queue}", flush=True)
        calls = schedule(seconds, args.seed)
        print(
            f"{args.minutes:g} min, {len(calls):,} calls from {KEYS} API keys x {AGENTS} agents"
            f" (per key {KEY_RATE}/s burst {KEY_BURST}, per agent {AGENT_RATE}/s burst"
            f" {AGENT_BURST}); 3 workers (prefork, 2 slots); a worker killed every"
            f" {args.worker_kill_every:g} s, the store every {args.store_kill_every:g} s for"
            f" {args.outage:g} s",
            flush=True,
        )
        stop = threading.Event()
        try:
            faults.slots = [faults.start_worker() for _ in range(3)]
            producer = Producer(broker, queue, calls)
            killer = threading.Thread(
                target=faults.run,
                args=(seconds, args.worker_kill_every, args.store_kill_every, args.outage, stop),
                name="soak-faults",
                daemon=True,
            )
            start, wall_start = time.monotonic(), time.time()
            producer.start()
            killer.start()
            depth = Depth(broker, queue)
            stack.callback(depth.close)
            rows, ran = watch(record, depth, store, producer, faults, start, seconds, step)
            producer.stop.set()
            producer.join()
            stop.set()
            killer.join()
            for error in (producer.error, faults.error):
                if error is not None:
                    raise error
            if not store.is_running:
                store.start()
            rows.append(drain(record, store, producer, ran, start))
            for workers in faults.slots:
                workers.stop()
        except BaseException:
            stop.set()
            for workers in faults.slots:
                workers.kill()
            raise
        left = depth.left()
        report(rows, record, producer.plan, faults, left, wall_start)
    print(f"\ntotal time {time.monotonic() - began:.0f} s")


class Depth:
    """Messages waiting in the run's queue."""

    def __init__(self, broker: str, queue: str) -> None:
        self.queue = queue
        self.conn = Connection(broker, connect_timeout=5)
        self.redis = redis.Redis.from_url(broker) if broker.startswith("redis") else None

    def __call__(self) -> int:
        if self.redis is not None:  # (kombu's passive declare refuses an empty Redis queue)
            return int(self.redis.llen(self.queue))
        declared = self.conn.default_channel.queue_declare(self.queue, passive=True)
        return int(declared.message_count)

    def left(self) -> int:
        """Once the workers are gone: what is still waiting, or held unacknowledged (Redis)."""
        return self() + (int(self.redis.hlen("unacked")) if self.redis else 0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.default_channel.queue_delete(self.queue)
        self.conn.close()


def watch(
    record: redis.Redis,
    depth: Depth,
    store: Any,
    producer: Producer,
    faults: Faults,
    start: float,
    seconds: float,
    step: float,
) -> tuple[list[Row], set[int]]:
    """Follow the run until ``seconds`` have passed: runs as they are recorded, the store's
    memory about every second, a row per ``step`` seconds."""
    rows = [Row(end=step)]
    ran: set[int] = set()
    sampled = 0.0
    logged = 0
    deferred = 0
    sent = 0
    while True:
        now = time.monotonic() - start
        if now >= rows[-1].end or now >= seconds:
            row = rows[-1]
            total = sum(int(v) for v in record.hvals(DEFERRALS))
            row.deferred, deferred = total - deferred, total
            row.sent, sent = len(producer.plan) - sent, len(producer.plan)
            state = store_state(store)
            row.keys = state[1] if state else None
            if now >= seconds:
                return rows, ran
            print(f"  {row.end:5.0f} s: {row.sent:,} sent, {row.ran:,} ran", flush=True)
            rows.append(Row(end=rows[-1].end + step))
        # Each run pushes one entry: wait for some, take all there are.
        got = record.blmpop(0.5, 1, STARTED, direction="LEFT", count=1000)
        for i in got[1] if got else ():
            rows[-1].ran += 1
            ran.add(int(i))
        if now - sampled >= 1.0:
            sampled = now
            state = store_state(store)
            if state is not None:
                rows[-1].memory = max(rows[-1].memory or 0, state[0])
            rows[-1].queue = max(rows[-1].queue, depth())
        for _, event in faults.log[logged:]:
            rows[-1].events.append(event)
        logged = len(faults.log)


def drain(record: redis.Redis, store: Any, producer: Producer, ran: set[int], start: float) -> Row:
    """Wait until every task sent has run (at most DRAIN seconds); the last row."""
    deadline = time.monotonic() + DRAIN
    row = Row(end=0.0, events=["traffic stopped; waiting for the last tasks"])
    before = sum(int(v) for v in record.hvals(DEFERRALS))
    while len(ran) < len(producer.plan) and time.monotonic() < deadline:
        got = record.blmpop(0.5, 1, STARTED, direction="LEFT", count=1000)
        for i in got[1] if got else ():
            row.ran += 1
            ran.add(int(i))
        state = store_state(store)
        if state is not None:
            row.memory = max(row.memory or 0, state[0])
    row.end = time.monotonic() - start
    row.deferred = sum(int(v) for v in record.hvals(DEFERRALS)) - before
    state = store_state(store)
    row.keys = state[1] if state else None
    return row


# -- the report --------------------------------------------------------------------------------


@dataclass
class Episode:
    """A stretch in which a key or an agent ran more than its burst + rate within 1 s."""

    at: float  # wall time of the first run over the bound
    name: str
    worst: int  # the most runs in 1 s
    bound: int
    near_outage: bool


def violations(
    runs: list[list[Any]], plan: list[tuple[str, str]], outages: list[tuple[float, float]]
) -> list[Episode]:
    """Every episode in which a key ran more than KEY_BURST + KEY_RATE within 1 s, or an agent
    more than AGENT_BURST + AGENT_RATE."""
    by_key: dict[str, list[float]] = {}
    by_agent: dict[str, list[float]] = {}
    for i, started, *_, at in runs:
        t = started if at is None else at
        api_key, agent_id = plan[i]
        by_key.setdefault(api_key, []).append(t)
        by_agent.setdefault(f"{api_key}/{agent_id}", []).append(t)
    episodes: list[Episode] = []
    for groups, bound in ((by_key, KEY_BURST + KEY_RATE), (by_agent, AGENT_BURST + AGENT_RATE)):
        for name, times in groups.items():
            times.sort()
            current: Episode | None = None
            j = 0
            for k, t in enumerate(times):
                while times[j] <= t - 1.0:
                    j += 1
                count = k - j + 1
                if count <= bound:
                    continue
                if current is not None and times[j] <= current.at + 1.0:
                    current.worst = max(current.worst, count)  # the same episode goes on
                    continue
                near = any(
                    killed - 1.0 <= t and times[j] <= back + OUTAGE_SETTLE
                    for killed, back in outages
                )
                current = Episode(times[j], name, count, bound, near)
                episodes.append(current)
    return sorted(episodes, key=lambda e: e.at)


def report(
    rows: list[Row],
    record: redis.Redis,
    plan: list[tuple[str, str]],
    faults: Faults,
    left: int,
    wall_start: float,
) -> None:
    runs = [json.loads(x) for x in record.lrange(RUNS, 0, -1)]
    by_task: dict[int, list[list[Any]]] = {}
    for r in runs:
        by_task.setdefault(r[0], []).append(r)
    lost = [i for i in range(len(plan)) if i not in by_task]
    duplicated, reruns = [], 0
    for i, seen in by_task.items():
        if len({r[2] for r in seen}) > 1 or not all(r[3] for r in seen[1:]):
            duplicated.append(i)
        elif len(seen) > 1:
            reruns += 1
    episodes = violations(runs, plan, faults.outages)
    elsewhere = [e for e in episodes if not e.near_outage]
    reasons = {k.decode(): int(v) for k, v in record.hgetall(DEFERRALS).items()}
    print()
    body = [
        ["until", "sent", "ran", "deferred", "queue", "store used_memory", "store keys", "faults"]
    ]
    for row in rows:
        body.append(
            [
                f"{row.end:.0f} s",
                f"{row.sent:,}",
                f"{row.ran:,}",
                f"{row.deferred:,}",
                f"{row.queue:,}",
                "down" if row.memory is None else f"{row.memory / 1024:,.0f} KiB",
                "down" if row.keys is None else f"{row.keys:,}",
                "; ".join(row.events),
            ]
        )
    print(table(body, markdown=False, right=[True] * 7 + [False]))
    print()
    print(f"tasks sent              {len(plan):,}")
    print(f"completed               {len(by_task):,}")
    print(f"lost                    {len(lost):,}   (goal 0)")
    print(f"duplicated              {len(duplicated):,}   (goal 0: ran as two copies, or unasked)")
    print(f"re-run after a kill     {reruns:,}   (same copy redelivered: Celery's acks_late)")
    print(f"left in the broker      {left:,}")
    around = len(episodes) - len(elsewhere)
    print(
        f"limit violations        {len(elsewhere):,}   (goal 0; and {around:,}"
        f" within {OUTAGE_SETTLE:g} s of a store outage, which empties every bucket)"
    )
    for e in elsewhere[:10]:
        before = [(t, what) for t, what in faults.log if t <= e.at]
        after = f", {e.at - before[-1][0]:.1f} s after: {before[-1][1]}" if before else ""
        print(
            f"    at {e.at - wall_start:5.1f} s: {e.name} ran {e.worst} in 1 s"
            f" (bound {e.bound}){after}"
        )
    print(f"deferrals by reason     {dict(sorted(reasons.items()))}")
    kills = Counter(event.split()[0] for _, event in faults.log)
    print(f"faults                  {kills['worker']} worker kills, {kills['store']} store kills")
    if lost or duplicated:
        history(record, by_task, lost, duplicated, faults, wall_start)


def history(
    record: redis.Redis,
    by_task: dict[int, list[list[Any]]],
    lost: list[int],
    duplicated: list[int],
    faults: Faults,
    wall_start: float,
) -> None:
    """What happened to the first few tasks lost or run twice: their deferrals and runs, with
    the faults, in time since the start."""
    wanted = {f"soak-{i}": i for i in [*lost[:5], *duplicated[:5]]}
    events: dict[int, list[tuple[float, str]]] = {i: [] for i in wanted.values()}
    for raw in record.lrange(DEFERRAL_LOG, 0, -1):
        task_id, t, reason, limit, countdown, node = json.loads(raw)
        if task_id in wanted:
            events[wanted[task_id]].append(
                (t, f"deferred by {node} ({reason}, {limit}, {countdown:.3f} s)")
            )
    for i in events:
        for _, t, token, redelivered, node, _ in by_task.get(i, []):
            again = ", redelivered" if redelivered else ""
            events[i].append((t, f"ran on {node} as copy {token}{again}"))
    print("\nwhat happened to them (s since the start):")
    for i, seen in events.items():
        kind = "lost" if i in lost else "duplicated"
        print(f"  task {i} ({kind}):")
        first = min((t for t, _ in seen), default=wall_start)
        last = max((t for t, _ in seen), default=wall_start)
        nearby = [(t, f"FAULT: {what}") for t, what in faults.log if first - 60 <= t <= last + 60]
        for t, what in sorted(seen + nearby):
            print(f"    {t - wall_start:7.2f}  {what}")


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the traffic")
    parser.add_argument("--quick", action="store_true", help="one minute, faults more often")
    parser.add_argument("--worker-kill-every", type=float, help="seconds (default 60; quick 20)")
    parser.add_argument("--store-kill-every", type=float, help="seconds (default 120; quick 30)")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds the store stays down")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--redis-url", help="broker and record here (ITS DBS 1 AND 3 ARE FLUSHED)")
    parser.add_argument("--broker", help="another broker, e.g. amqp://guest:guest@127.0.0.1//")
    parser.add_argument("--logdir", type=Path, help="keep the worker logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 1.0
    args.worker_kill_every = args.worker_kill_every or (20.0 if args.quick else 60.0)
    args.store_kill_every = args.store_kill_every or (30.0 if args.quick else 120.0)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as stack:
        if args.logdir:
            args.logdir.mkdir(parents=True, exist_ok=True)
            logdir = args.logdir
        else:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-soak-")))
        url, where = stack.enter_context(redis_server(args.redis_url))
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        run(args, url, where, logdir)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: workers killed, redis-servers stopped", file=sys.stderr)
        sys.exit(130)
