# SPDX-License-Identifier: MIT
"""``make demo``, shortened: the demo runs against the suite's Redis (real workers, the simulated
provider, the producer) and its summary shows the promises kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from examples.agents.tenants import TENANTS
from tests.redis_servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
TRAFFIC = 25  # seconds of traffic; the whole run takes about 40 s


@pytest.fixture(scope="module")
def demo(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short run of the demo: its summary, its output and the chart's path."""
    out = tmp_path_factory.mktemp("demo")
    chart, summary = out / "chart.png", out / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "examples.demo", "--duration", str(TRAFFIC), "--no-live"),
            *("--chart", str(chart), "--json-summary", str(summary)),
        ],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_server.url},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return {"summary": json.loads(summary.read_text()), "output": output, "chart": chart}


def test_nothing_lost_and_nothing_run_twice(demo: dict[str, Any]) -> None:
    """Every task enqueued either completed exactly once or is still waiting in the broker."""
    tasks = demo["summary"]["tasks"]
    assert tasks["enqueued"] > 1000  # the runaway's thousand, and the other agents' work
    assert tasks["lost"] == 0
    assert tasks["completed_twice"] == 0
    assert tasks["unknown"] == 0
    assert tasks["completed"] + tasks["pending"] == tasks["enqueued"]
    assert tasks["completed"] > 50


def test_every_key_stays_within_its_limit(demo: dict[str, Any]) -> None:
    """Over the run, no key's admissions exceed its burst plus its rate times the run; each key
    got work done."""
    for label, key in demo["summary"]["keys"].items():
        assert key["within_limit"], (label, key)
        assert key["admissions"] <= key["burst"] + key["configured_per_s"] * TRAFFIC + 1
        assert key["completed"] > 0, label


def test_the_runaway_waits_while_its_siblings_go_on(demo: dict[str, Any]) -> None:
    """The runaway agent's calls are deferred and admitted at its agent share; the work its
    siblings were given after it started was mostly done (its backlog did not hold their
    API key's bucket)."""
    summary = demo["summary"]
    runaway = summary["agents"][summary["runaway"]["agent"]]
    tenant = runaway["tenant"]
    siblings = [a for a in summary["agents"].values() if a["tenant"] == tenant and not a["runaway"]]
    assert runaway["enqueued"] == 1000
    assert runaway["deferred_tasks"] >= 990
    assert runaway["achieved_per_s"] <= runaway["share_per_s"] + 3 / TRAFFIC
    later = sum(a["enqueued_after_runaway"] for a in siblings)
    done = sum(a["completed_after_runaway"] for a in siblings)
    assert later > 0
    assert done >= 0.6 * later, siblings
    assert sum(a["admissions_after_runaway"] for a in siblings) >= done


def test_the_provider_was_called_and_answered_429_above_its_capacity(
    demo: dict[str, Any],
) -> None:
    """The simulated provider answered; its 429s went to the key that asks for more than its
    capacity, and each was a deferral, not a failure."""
    summary = demo["summary"]
    assert summary["provider"]["200"] == summary["tasks"]["completed"]
    refused = {label: k["provider_429"] for label, k in summary["keys"].items()}
    assert refused["initech"] == summary["provider"].get("429", 0)
    assert summary["deferrals"]["by_reason"].get("upstream", 0) == refused["initech"]


def test_the_chart_is_a_png_and_no_api_key_is_shown(demo: dict[str, Any]) -> None:
    """The chart is written where asked and its path printed; the output names tenants by
    their labels and never shows an API key."""
    chart: Path = demo["chart"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(chart) in demo["output"]
    assert "acme (default)" in demo["output"]
    for tenant in TENANTS.values():
        assert tenant.api_key not in demo["output"]
