# SPDX-License-Identifier: MIT
"""How much one admission decision costs, against the cheapest possible Redis script call and
against other Python rate limiters on the same server.

Run from the repository root: ``python benchmarks/decision.py`` (``make bench-decision``).
Everything below is measured in one run against one Redis server: by default a private
``redis-server`` started for the run (``tests.redis_servers.RedisServer``), or ``--redis-url``.
That server is emptied with FLUSHALL at the start and again before the memory measurement.

What is measured
    Latency: the wall time of one call from Python, ``time.perf_counter_ns`` around each call,
    client and server on the same machine (loopback). Every contender makes many calls per
    round; within a round the contenders take turns in small chunks, starting with a different
    one each time, so drift in the machine's load hits them all alike. A contender's result is
    the median over rounds of its per-round p50.
    ``in Redis`` is the server's own time per call (``INFO commandstats``, one extra pass
    after the rounds); the rest of the latency is the client library and the network stack.

    - floor: ``EVALSHA`` of a script that only does ``return 1``, through plain redis-py. No
      limiter that decides in a Redis script can beat one round trip plus one script call.
    - throttle: ``RedisStore.admit`` with two limits at once (per API key, and per API key and
      agent), ``reserve=True`` (so a booking id is generated), with limits that never bind, so
      every call is an admission. With 1, 1,000 and 100,000 distinct API keys, cycled through;
      the 100,000 buckets are created before measuring, by the store then measured with them
      (so it is in the state of a store that serves that many tenants, not one just started),
      and kept alive for the whole run.
    - peers, one limit per call, 1,000 keys: ``limits`` (Redis storage; fixed window and moving
      window, ``hit()``) and ``throttled-py`` (GCRA and token bucket, its Redis store).

    Throughput: processes that each have their own client (and store) and make admissions
    back to back against 1,000 keys, started together; total calls over the wall time from the
    first start to the last finish. The floor is measured the same way.

    Memory: ``used_memory`` from ``INFO memory`` before and after creating 10,000 token-bucket
    buckets (10,000 API keys, one limit each, so 10,000 Redis keys), divided by 10,000. The limit
    is slow (``10/h``) so that no key expires while measuring.

How to read it
    ``x floor`` is the latency divided by the floor's: 1.00 would mean the decision costs
    nothing beyond the round trip. Most of the floor is the network stack and redis-py, so the
    ratios move less between machines than the microseconds do. Every ratio here is taken
    round by round (the two contenders' p50s of one round, measured side by side) and the
    median of those is given: the machine's speed moves from one round to the next, and a
    ratio of two medians, each of rounds on their own, moves with it. The goals at the end
    come from the performance issue; each is printed with PASS or FAIL, and the ratios of
    every round.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import multiprocessing
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from typing import Any

import redis
from _common import redis_server, table, verdict  # beside this script

from throttle import Keyspace, Limit, RedisStore

SECRET = "benchmark-secret-0123456789abcdef"

#: Limits that never bind: every call is an admission.
KEY_LIMIT = Limit("req", "1000000/s", burst=1000000)
AGENT_LIMIT = Limit("agent", "1000000/s", burst=1000000, per=["api_key", "agent_id"])
#: Slow enough that no bucket expires while the memory is measured.
MEMORY_LIMIT = Limit("req", "10/h")
PEER_RATE = 1_000_000  # per second, for the peers: never binds either

AGENTS_PER_KEY = 8  # agent ids cycle within each API key
PEER_KEYS = 1_000
THROUGHPUT_KEYS = 1_000
MEMORY_BUCKETS = 10_000
BIG_KEYS = 100_000
CHUNK = 50  # calls a contender makes before the next one takes its turn
KEEP_ALIVE_MS = 3_600_000  # how long pre-created buckets are kept

# Goals from the issue.
GOAL_FLOOR_RATIO = 1.1
GOAL_SCALE_RATIO = 1.2
GOAL_BYTES = 200.0


@dataclass(frozen=True)
class Settings:
    rounds: int
    calls: int  # timed calls per contender per round
    warmup: int  # untimed calls per contender before the first round
    processes: int
    per_process: int  # admissions per process per throughput round
    profile: int  # calls to profile (0: no profile)


@dataclass
class Contender:
    name: str
    limits: str
    keys: int
    call: Callable[[], object]
    p50s: list[float] = field(default_factory=list)  # per round, in microseconds
    server_us: float = 0.0  # Redis's own time per call (INFO commandstats)
    samples: list[int] = field(default_factory=list)  # the current round, in nanoseconds

    @property
    def p50(self) -> float:
        return statistics.median(self.p50s)

    def ratios(self, other: Contender) -> list[float]:
        """Each round's p50 divided by ``other``'s in the same round."""
        return [a / b for a, b in zip(self.p50s, other.p50s, strict=True)]

    def ratio(self, other: Contender) -> float:
        """This contender's latency as a multiple of ``other``'s: the median over rounds of
        the ratio of their p50s in each round."""
        return statistics.median(self.ratios(other))


# -- the calls being measured ---------------------------------------------------------------


def identities(count: int, offset: int = 0) -> list[dict[str, str]]:
    """``count`` distinct API keys, each with one of a few agents, starting at ``offset``."""
    return [
        {"api_key": f"key-{i}", "agent_id": f"agent-{i % AGENTS_PER_KEY}"}
        for i in range(offset, offset + count)
    ]


def ours(
    url: str, keys: int, start: int = 0, store: RedisStore | None = None
) -> Callable[[], object]:
    """One two-limit admission per call, cycling through ``keys`` identities, by ``store`` (a
    new one by default)."""
    if store is None:
        store = RedisStore(redis.Redis.from_url(url), Keyspace(SECRET))
    people = identities(keys)
    cycle = itertools.cycle(people[start:] + people[:start])
    limits = [KEY_LIMIT, AGENT_LIMIT]
    admit = store.admit

    def call() -> object:
        return admit(limits, next(cycle), reserve=True)

    return call


def floor(url: str) -> Callable[[], object]:
    """The cheapest script call: ``EVALSHA`` of ``return 1`` through plain redis-py."""
    client = redis.Redis.from_url(url)
    sha = client.script_load("return 1")

    def call() -> object:
        return client.evalsha(sha, 0)

    return call


def limits_lib(url: str, strategy: str) -> Callable[[], object]:
    """The ``limits`` library: its Redis storage and the fixed or moving window strategy."""
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    storage = RedisStorage(url)
    kinds = {"fixed": FixedWindowRateLimiter, "moving": MovingWindowRateLimiter}
    limiter = kinds[strategy](storage)
    item = RateLimitItemPerSecond(PEER_RATE)
    # The two strategies would share key names: give each its own identifiers.
    cycle = itertools.cycle([f"{strategy}-{i}" for i in range(PEER_KEYS)])
    hit = limiter.hit

    def call() -> object:
        return hit(item, next(cycle))

    return call


def throttled_lib(url: str, algorithm: str) -> Callable[[], object]:
    """``throttled-py``: GCRA or token bucket with its Redis store, non-blocking."""
    from throttled import RedisStore as ThrottledRedisStore
    from throttled import Throttled, per_sec

    limiter = Throttled(
        using=algorithm,
        quota=per_sec(PEER_RATE, burst=PEER_RATE),
        store=ThrottledRedisStore(server=url),
        timeout=-1,
    )
    cycle = itertools.cycle([f"{algorithm}-{i}" for i in range(PEER_KEYS)])
    limit = limiter.limit

    def call() -> object:
        return limit(next(cycle))

    return call


def admitted(result: object) -> bool:
    """Whether a contender's call was an admission (each library says so differently)."""
    if isinstance(result, bool):  # limits
        return result
    limited = getattr(result, "limited", None)  # throttled-py
    if limited is not None:
        return not limited
    allowed = getattr(result, "allowed", None)  # ours
    if allowed is not None:
        return bool(allowed)
    return result == 1  # the floor


# -- latency ----------------------------------------------------------------------------------


def measure_latency(contenders: Sequence[Contender], settings: Settings) -> None:
    for c in contenders:
        for _ in range(settings.warmup):
            result = c.call()
        if not admitted(result):
            raise SystemExit(f"{c.name}: the warm-up call was not admitted ({result!r})")
    chunks = max(1, settings.calls // CHUNK)
    clock = time.perf_counter_ns
    for rnd in range(settings.rounds):
        for c in contenders:
            c.samples = []
        gc.collect()
        for chunk in range(chunks):
            turn = (chunk + rnd) % len(contenders)
            for c in (*contenders[turn:], *contenders[:turn]):
                call, out = c.call, c.samples
                for _ in range(CHUNK):
                    t0 = clock()
                    call()
                    out.append(clock() - t0)
        for c in contenders:
            c.p50s.append(statistics.median(c.samples) / 1000)


def measure_server_time(url: str, contenders: Sequence[Contender], calls: int) -> None:
    """Redis's own time per call of each contender: ``CONFIG RESETSTAT``, ``calls`` calls, then
    the time ``INFO commandstats`` reports for the commands they issued. A script's time
    includes the commands it runs, which the stats list again under their own names: for a
    contender that runs scripts, only the script commands count."""
    client = redis.Redis.from_url(url)
    scripts = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")
    for c in contenders:
        client.config_resetstat()
        for _ in range(calls):
            c.call()
        stats = {
            k: v
            for k, v in client.info("commandstats").items()
            if isinstance(v, dict)
            and k not in ("cmdstat_config", "cmdstat_info")
            and not k.startswith("cmdstat_config|")
        }
        if any(k in stats for k in scripts):
            stats = {k: v for k, v in stats.items() if k in scripts}
        c.server_us = sum(int(v["usec"]) for v in stats.values()) / calls


def populate(store: RedisStore, keys: int) -> int:
    """Create the buckets of ``keys`` identities with real admissions by ``store``, and keep
    them alive for the run (with limits that never bind they would expire seconds after their
    last use). Returns the number of keys the database holds afterwards."""
    client = store.client
    assert isinstance(client, redis.Redis)
    limits = [KEY_LIMIT, AGENT_LIMIT]
    batch: list[str] = []
    for identity in identities(keys):
        decision = store.admit(limits, identity)
        assert decision.receipt is not None
        batch += [c.bucket.key for c in decision.receipt.charges]
        if len(batch) >= 2_000:
            _keep_alive(client, batch)
            batch = []
    _keep_alive(client, batch)
    return int(client.dbsize())


def _keep_alive(client: redis.Redis, keys: list[str]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.pexpire(key, KEEP_ALIVE_MS)
        pipe.execute()


# -- throughput -------------------------------------------------------------------------------


def _throughput_worker(
    kind: str, url: str, index: int, calls: int, barrier: Barrier, results: Any
) -> None:
    if kind == "ours":
        start = index * THROUGHPUT_KEYS // 4 % THROUGHPUT_KEYS
        call = ours(url, THROUGHPUT_KEYS, start)
    else:
        call = floor(url)
    for _ in range(min(calls, 500)):
        call()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    results.put((t0, time.perf_counter()))


def measure_throughput(url: str, kind: str, settings: Settings) -> float:
    """Calls per second of ``settings.processes`` processes together."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(settings.processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_throughput_worker,
            args=(kind, url, i, settings.per_process, barrier, results),
        )
        for i in range(settings.processes)
    ]
    for p in procs:
        p.start()
    spans: list[tuple[float, float]] = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a {kind} throughput worker failed (exit code {p.exitcode})")
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return settings.processes * settings.per_process / wall


# -- memory -----------------------------------------------------------------------------------


def measure_memory(url: str) -> tuple[float, int]:
    """Bytes of ``used_memory`` per token bucket over 10,000 new ones, and the keys created."""
    client = redis.Redis.from_url(url)
    store = RedisStore(client, Keyspace(SECRET, prefix="mem"))
    store.admit([MEMORY_LIMIT], {"api_key": "loads-the-script"})
    client.flushall()
    gc.collect()
    before = int(client.info("memory")["used_memory"])
    for i in range(MEMORY_BUCKETS):
        store.admit([MEMORY_LIMIT], {"api_key": f"tenant-{i}"})
    after = int(client.info("memory")["used_memory"])
    created = int(client.dbsize())
    client.flushall()
    return (after - before) / MEMORY_BUCKETS, created


# -- output -----------------------------------------------------------------------------------


COLUMNS_RIGHT = [False, False, True, True, True, True, True]


def report(
    contenders: Sequence[Contender],
    throughput: dict[str, float],
    memory: tuple[float, int],
    big_dbsize: int,
    settings: Settings,
    markdown: bool,
) -> None:
    base_c, one_c, mid_c, big_c = contenders[:4]  # floor, then throttle by key count
    rows = [
        [
            "contender",
            "limits per call",
            "keys",
            "p50 us",
            "x floor",
            "round p50s us",
            "in Redis us",
        ]
    ]
    for c in contenders:
        spread = f"{min(c.p50s):.1f}-{max(c.p50s):.1f}"
        p50, ratio, server = f"{c.p50:.1f}", f"{c.ratio(base_c):.2f}", f"{c.server_us:.1f}"
        rows.append([c.name, c.limits, f"{c.keys:,}", p50, ratio, spread, server])
    print()
    print(
        f"Latency of one call: median over {settings.rounds} rounds of the p50 of "
        f"{settings.calls:,} calls per round (peers check one limit per call; throttle checks "
        "two, with reserve=True)."
    )
    print(table(rows, markdown, COLUMNS_RIGHT))
    print(
        f"(the keyspace held {big_dbsize:,} keys during the latency rounds; 'in Redis' is the "
        "server's own time per call from INFO commandstats, the rest is client and network)"
    )

    per_proc = f"{settings.processes} processes x {settings.per_process:,} calls"
    ours_tp, floor_tp = throughput["ours"], throughput["floor"]
    print()
    print(f"Throughput, {per_proc}, 1,000 keys (median of {settings.rounds} rounds):")
    print(f"  throttle admit (2 limits): {ours_tp:>10,.0f} admissions/s")
    print(f"  floor (EVALSHA return 1):  {floor_tp:>10,.0f} calls/s")
    print(f"  throttle / floor:          {ours_tp / floor_tp:>10.2f}")

    per_bucket, created = memory
    print()
    print(
        f"Memory: FLUSHALL, then {MEMORY_BUCKETS:,} token buckets ({created:,} keys created): "
        f"{per_bucket:.1f} bytes of used_memory per bucket"
    )

    mid, big = mid_c.ratio(base_c), big_c.ratio(one_c)
    print()
    print("Goals (each round's ratio in brackets):")
    print(
        f"  {verdict(mid <= GOAL_FLOOR_RATIO)}  two-limit admission (1,000 keys) "
        f"<= {GOAL_FLOOR_RATIO}x floor: {mid:.2f}x {_rounds(mid_c.ratios(base_c))}"
    )
    print(
        f"  {verdict(big <= GOAL_SCALE_RATIO)}  {big_c.keys:,} keys <= "
        f"{GOAL_SCALE_RATIO}x 1 key: {big:.2f}x {_rounds(big_c.ratios(one_c))}"
    )
    print(
        f"  {verdict(per_bucket <= GOAL_BYTES)}  <= {GOAL_BYTES:.0f} bytes per bucket: "
        f"{per_bucket:.1f}"
    )


def _rounds(ratios: Sequence[float]) -> str:
    return "[" + " ".join(f"{r:.2f}" for r in ratios) + "]"


def profile(url: str, calls: int) -> None:
    """cProfile over ``calls`` admissions (1,000 keys): where the client-side time goes."""
    call = ours(url, 1_000)
    for _ in range(1_000):
        call()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    print()
    print(f"cProfile of {calls:,} admissions (2 limits, 1,000 keys), top entries by tottime:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)


# -- running it -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: fewer calls")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--redis-url", help="measure against this server instead (ALL ITS DATA IS FLUSHED)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N admissions with cProfile and print the top entries",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    settings = Settings(
        rounds=args.rounds,
        calls=400 if args.quick else 2_000,
        warmup=100 if args.quick else 1_000,
        processes=4,
        per_process=500 if args.quick else 4_000,
        profile=args.profile,
    )
    big_keys = 5_000 if args.quick else BIG_KEYS
    started = time.perf_counter()
    with redis_server(args.redis_url) as (url, where):
        client = redis.Redis.from_url(url)
        server = client.info("server")
        print(
            f"Redis {server['redis_version']} ({where}, {url}); Python "
            f"{platform.python_version()}, redis-py {redis.__version__}; "
            f"{multiprocessing.cpu_count()} CPUs"
        )
        client.flushall()
        print(f"FLUSHALL; creating the buckets of {big_keys:,} identities ...", flush=True)
        # By the store that is then measured with them: in the state a store serving that many
        # tenants is in (what it remembers of them, and what it has stopped remembering).
        big_store = RedisStore(redis.Redis.from_url(url), Keyspace(SECRET))
        big_dbsize = populate(big_store, big_keys)

        contenders = [
            Contender("floor", "0 (EVALSHA return 1)", 0, floor(url)),
            Contender("throttle 1 key", "2", 1, ours(url, 1)),
            Contender("throttle 1,000 keys", "2", 1_000, ours(url, 1_000)),
            Contender(
                f"throttle {big_keys:,} keys", "2", big_keys, ours(url, big_keys, store=big_store)
            ),
            Contender("limits fixed window", "1", PEER_KEYS, limits_lib(url, "fixed")),
            Contender("limits moving window", "1", PEER_KEYS, limits_lib(url, "moving")),
            Contender("throttled-py GCRA", "1", PEER_KEYS, throttled_lib(url, "gcra")),
            Contender(
                "throttled-py token bucket", "1", PEER_KEYS, throttled_lib(url, "token_bucket")
            ),
        ]
        print(f"latency: {settings.rounds} rounds x {settings.calls:,} calls ...", flush=True)
        measure_latency(contenders, settings)
        measure_server_time(url, contenders, settings.calls // 2)

        print("throughput ...", flush=True)
        samples: dict[str, list[float]] = {"ours": [], "floor": []}
        for rnd in range(settings.rounds):
            order = ("ours", "floor") if rnd % 2 == 0 else ("floor", "ours")
            for kind in order:
                samples[kind].append(measure_throughput(url, kind, settings))
        throughput = {kind: statistics.median(v) for kind, v in samples.items()}

        print("memory ...", flush=True)
        memory = measure_memory(url)
        report(contenders, throughput, memory, big_dbsize, settings, args.markdown)
        if settings.profile:
            profile(url, settings.profile)
    print()
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
