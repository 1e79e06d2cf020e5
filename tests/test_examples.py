# SPDX-License-Identifier: MIT
"""The examples run as users would run them, against the suite's private Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.redis_servers import RedisServer

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, server: RedisServer) -> list[str]:
    """Run ``examples/<name>`` against ``server``; its output lines."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env={**os.environ, "REDIS_URL": server.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_admission_core_example(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """examples/admission_core.py admits, books, comes back at its slot and redeems."""
    lines = run_example("admission_core.py", redis_server)
    assert lines[0].startswith("step 0: admitted")
    assert any("booked by agent-share" in line for line in lines)
    assert any("came back at its slot: redeemed" in line for line in lines)


def test_edge_api_example(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """examples/edge_api.py: the first calls pass, the next are refused at the door and get
    through after the client's wait, each wait under the whole second Retry-After says."""
    lines = run_example("edge_api.py", redis_server)
    assert len(lines) == 5
    assert all(": 200 after " in line for line in lines)
    assert lines[0].startswith("call 0: 200 after 0 429(s)")
    assert lines[0].endswith("1 left")
    refused = [line for line in lines if " after 0 429(s)" not in line]
    assert refused  # 5 calls at once through a burst of 2 at 2/s: later ones wait
    for line in refused:
        waited = float(line.split("waited ")[1].split(" s")[0])
        assert 0 < waited < 1
