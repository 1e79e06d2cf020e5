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


def test_admission_core_example(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """examples/admission_core.py admits, books, comes back at its slot and redeems."""
    env = {**os.environ, "REDIS_URL": redis_server.url}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "admission_core.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("step 0: admitted")
    assert any("booked by agent-share" in line for line in lines)
    assert any("came back at its slot: redeemed" in line for line in lines)
