# SPDX-License-Identifier: MIT
"""Adaptive limits against a SIMULATED LLM provider and under real CPU load.

Run from the repository root: ``python benchmarks/adaptive.py`` (``make bench-adaptive``);
``--quick`` shortens every part, ``--markdown`` prints the tables as Markdown, ``--plot PATH``
chooses where the PNG goes (default: ``adaptive.png`` in the system's temporary directory).
Everything runs against one Redis server: a private ``redis-server`` started for the run
(``tests.redis_servers``) unless ``--redis-url`` is given (its dbs 0, 1 and 2 are FLUSHED).

What is measured
    1. Upstream feedback. A simulated provider on loopback (``tests/provider.py``: hidden
       capacity C = 20 requests/s per API key, burst C, 429 with ``Retry-After`` above it)
       behind a static limit of 40/s. One ``celery worker -P prefork -c 4`` of
       ``benchmarks.adaptiveapp`` works through a backlog of one API key's tasks for D seconds,
       twice: "static", whose task retries a 429 with ``self.retry(countdown=Retry-After)``
       (the usual Celery way), and "feedback", whose task lets the 429 through to throttle
       (deferral, a pause of the key's bucket, the key's upstream factor). The provider
       counts its answers per second. Goals (after the first 10 s): goodput at least 90% of C,
       and at most 5% of calls answered 429. The load factor is off in both runs (``cpu`` and
       ``memory`` ladders empty), so only the provider's feedback moves the limit.
    2. Worker load. One worker samples the host every second (its load sampler, psutil). This
       process asks for admissions against an adaptive 40/s limit at about 200 attempts/s and
       counts what is admitted per second, while the machine is quiet, then while one busy
       process per CPU runs for L seconds, then quiet again. Goals: within two intervals of the
       load starting the admitted rate is at most 0.3 of the limit, and within 30 s of the load
       ending it is back to the full rate (at least 90% of it in a second).
    The per-second series are printed as tables and drawn in one PNG.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from _common import ROOT, Workers, redis_server, table, verdict  # beside this script

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.provider import Provider
from throttle import Keyspace, Limit, RedisStore

APP = "benchmarks.adaptiveapp"
API_KEY = "tenant-1"
CAPACITY = 20.0  # the provider's hidden requests/s
LIMIT = 40.0  # our static limit, requests/s
WARMUP = 10.0  # seconds not counted in part 1
INTERVAL = 1.0  # the load sampler's interval in part 2
SECRET = "benchmark-secret-for-worker-processes"  # as in benchmarks/adaptiveapp.py

GOAL_GOODPUT = 0.9  # of CAPACITY
GOAL_429 = 0.05
GOAL_LOADED = 0.3  # of LIMIT, within two intervals
GOAL_BACK = 30.0  # seconds after the load ends


@dataclass(frozen=True)
class Settings:
    run: float  # seconds per part-1 run
    quiet: float  # part 2: quiet seconds before the load
    load: float  # part 2: seconds of load
    after: float  # part 2: quiet seconds after


FULL = Settings(run=60.0, quiet=10.0, load=20.0, after=40.0)
QUICK = Settings(run=30.0, quiet=6.0, load=12.0, after=35.0)


def urls_on(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    store, broker, backend = (urlunsplit(parts._replace(path=f"/{db}")) for db in (0, 1, 2))
    return store, broker, backend


# -- part 1: the provider's feedback ----------------------------------------------------------


def upstream_run(url: str, mode: str, settings: Settings, logdir: Path) -> dict[str, Any]:
    store, broker, backend = urls_on(url)
    redis.Redis.from_url(url).flushall()
    conf = {"throttle_adaptive": {"cpu": [], "memory": []}, "throttle_max_defer": 30.0}
    with Provider(capacity=CAPACITY) as provider:
        env = {
            "ADAPTIVE_BENCH_BROKER": broker,
            "ADAPTIVE_BENCH_BACKEND": backend,
            "ADAPTIVE_BENCH_STORE": store,
            "ADAPTIVE_BENCH_PROVIDER": provider.url,
            "ADAPTIVE_BENCH_CONF": json.dumps(conf),
        }
        with Workers(APP, env, broker, logdir, f"{mode}-") as workers:
            workers.start(1, concurrency=4)
            demand = int(settings.run * LIMIT * 1.5)
            with workers.client.producer_or_acquire() as producer:
                for i in range(demand):
                    workers.client.send_task(
                        f"adaptiveapp.{mode}",
                        (i,),
                        {"api_key": API_KEY},
                        producer=producer,
                    )
            deadline = time.monotonic() + settings.run + 30
            while not provider.log and time.monotonic() < deadline:
                time.sleep(0.05)
            if not provider.log:
                raise RuntimeError(
                    f"{mode}: the provider was never called:\n" + workers.log(workers.nodes[0])
                )
            first = provider.log[0][0]
            while provider.clock() < first + settings.run:
                time.sleep(0.2)
            log = [entry for entry in provider.log if entry[0] < first + settings.run]
            workers.client.control.purge()
    per_second: Counter[tuple[int, int]] = Counter()
    for at, _key, status in log:
        per_second[(int(at - first), status)] += 1
    counted = [(at, status) for at, _key, status in log if at - first >= WARMUP]
    span = settings.run - WARMUP
    ok = sum(1 for _, s in counted if s == 200)
    refused = sum(1 for _, s in counted if s == 429)
    return {
        "mode": mode,
        "series": [
            (second, per_second[(second, 200)], per_second[(second, 429)])
            for second in range(int(settings.run))
        ],
        "goodput": ok / span,
        "share_429": refused / max(1, ok + refused),
        "calls": ok + refused,
    }


# -- part 2: the worker's load ------------------------------------------------------------------


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def load_run(url: str, settings: Settings, logdir: Path) -> dict[str, Any]:
    store_url, broker, backend = urls_on(url)
    redis.Redis.from_url(url).flushall()
    conf = {"throttle_load_interval": INTERVAL}
    env = {
        "ADAPTIVE_BENCH_BROKER": broker,
        "ADAPTIVE_BENCH_BACKEND": backend,
        "ADAPTIVE_BENCH_STORE": store_url,
        "ADAPTIVE_BENCH_CONF": json.dumps(conf),
    }
    store = RedisStore(redis.Redis.from_url(store_url), Keyspace(SECRET))
    limit = Limit("llm", f"{LIMIT:g}/s", burst=LIMIT)
    who = {"api_key": API_KEY}
    series: list[tuple[float, int, float]] = []  # (second, admitted, factor in force)
    with Workers(APP, env, broker, logdir, "load-") as workers:
        workers.start(1, concurrency=2)
        start = time.monotonic()
        load_at, load_end = start + settings.quiet, start + settings.quiet + settings.load
        stop = load_end + settings.after
        burners: list[multiprocessing.Process] = []
        second, admitted, next_second = 0, 0, start + 1.0
        while time.monotonic() < stop:
            now = time.monotonic()
            if not burners and now >= load_at:
                burners = [
                    multiprocessing.Process(target=_burn, args=(load_end,), daemon=True)
                    for _ in range(os.cpu_count() or 1)
                ]
                for burner in burners:
                    burner.start()
            if now >= next_second:
                series.append((float(second), admitted, store.load_factor().in_force))
                second, admitted, next_second = second + 1, 0, next_second + 1.0
            if store.admit([limit], who, adaptive=True).allowed:
                admitted += 1
            time.sleep(0.005)  # pacing the demand (about 200 attempts/s), not synchronisation
        for burner in burners:
            burner.join(timeout=5)
    loaded_from = settings.quiet + 2 * INTERVAL
    during = [a for s, a, _ in series if loaded_from <= s < settings.quiet + settings.load]
    after = settings.quiet + settings.load
    back = next((s - after for s, a, _ in series if s >= after and a >= 0.9 * LIMIT), float("inf"))
    return {
        "series": series,
        "worst_loaded": max(during) / LIMIT if during else float("nan"),
        "back_after": back,
        "load": (settings.quiet, after),
    }


# -- output ---------------------------------------------------------------------------------


def plot(path: Path, runs: list[dict[str, Any]], load: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    for run in runs:
        seconds = [s for s, _, _ in run["series"]]
        top.plot(seconds, [ok for _, ok, _ in run["series"]], label=f"{run['mode']}: 200/s")
        top.plot(
            seconds,
            [no for _, _, no in run["series"]],
            linestyle=":",
            label=f"{run['mode']}: 429/s",
        )
    top.axhline(CAPACITY, color="grey", linestyle="--", label="provider capacity C")
    top.axvline(WARMUP, color="lightgrey")
    top.set_title("Simulated provider (C = 20/s) behind a static 40/s limit")
    top.set_xlabel("seconds")
    top.set_ylabel("answers per second")
    top.legend(fontsize=8)
    seconds = [s for s, _, _ in load["series"]]
    bottom.plot(seconds, [a for _, a, _ in load["series"]], label="admitted/s")
    bottom.plot(seconds, [f * LIMIT for _, _, f in load["series"]], label="limit x load factor")
    bottom.axhline(LIMIT, color="grey", linestyle="--", label="limit")
    bottom.axvspan(*load["load"], color="mistyrose", label="CPU load")
    bottom.set_title("Adaptive 40/s limit under CPU load (one busy process per CPU)")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("admissions per second")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables")
    parser.add_argument("--redis-url", help="run against this server (ITS DBS 0-2 ARE FLUSHED)")
    parser.add_argument("--plot", type=Path, default=Path(tempfile.gettempdir()) / "adaptive.png")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.monotonic()
    with (
        redis_server(args.redis_url) as (url, where),
        tempfile.TemporaryDirectory() as tmp,
    ):
        logdir = Path(tmp)
        print(f"Redis at {where}; Python {platform.python_version()}; {os.cpu_count()} CPUs")
        runs = []
        for mode in ("static", "feedback"):
            print(f"1. {mode}: {settings.run:g} s against the simulated provider ...", flush=True)
            runs.append(upstream_run(url, mode, settings, logdir))
        print("2. load: quiet, then one busy process per CPU, then quiet ...", flush=True)
        load = load_run(url, settings, logdir)
    rows = [["run", "goodput/s", "x C", "429 share", "calls"]]
    for run in runs:
        rows.append(
            [
                run["mode"],
                f"{run['goodput']:.1f}",
                f"{run['goodput'] / CAPACITY:.2f}",
                f"{run['share_429']:.1%}",
                f"{run['calls']:,}",
            ]
        )
    print(f"\nUpstream feedback (after the first {WARMUP:g} s):")
    print(table(rows, args.markdown, [False, True, True, True, True]))
    series = [["second", *(f"{r['mode']} 200/429" for r in runs)]]
    for i in range(len(runs[0]["series"])):
        series.append([str(i), *(f"{r['series'][i][1]}/{r['series'][i][2]}" for r in runs)])
    print("\nPer second:")
    print(table(series, args.markdown, [True] * len(series[0])))
    load_rows = [["second", "admitted", "factor"]]
    load_rows += [[f"{s:g}", str(a), f"{f:.2f}"] for s, a, f in load["series"]]
    print(f"\nWorker load (busy from {load['load'][0]:g} s to {load['load'][1]:g} s):")
    print(table(load_rows, args.markdown, [True, True, True]))
    plot(args.plot, runs, load)
    print(f"\nPlot: {args.plot}")
    feedback = runs[1]
    goals = [
        (
            feedback["goodput"] >= GOAL_GOODPUT * CAPACITY,
            f"feedback goodput >= {GOAL_GOODPUT:.0%} of C: {feedback['goodput'] / CAPACITY:.0%}",
        ),
        (
            feedback["share_429"] <= GOAL_429,
            f"feedback 429 share <= {GOAL_429:.0%}: {feedback['share_429']:.1%}",
        ),
        (
            load["worst_loaded"] <= GOAL_LOADED,
            f"under load, admitted <= {GOAL_LOADED} of the limit within two intervals: "
            f"{load['worst_loaded']:.2f}",
        ),
        (
            load["back_after"] <= GOAL_BACK,
            f"full rate again within {GOAL_BACK:g} s of the load ending: {load['back_after']:g} s",
        ),
    ]
    print("\nGoals:")
    for ok, text in goals:
        print(f"  {verdict(ok)}  {text}")
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
