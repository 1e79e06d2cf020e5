# SPDX-License-Identifier: MIT
"""``celery throttle ...`` against the private Redis: the commands run through click as Celery's
CLI runs them (the app in the context object), the traffic comes from the real gate, and one
test runs the installed ``celery`` command in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result

import throttle
from tests.conftest import TIMEOUT, make_app
from tests.redis_servers import RedisServer
from tests.workers import DEFAULT_LIMITS
from throttle.adaptive.policy import Sample
from throttle.celeryext.cli import throttle as cli
from throttle.celeryext.counts import Tally, traffic

RAW = "sk-live-raw-api-key-0001"
OTHER_RAW = "sk-live-raw-api-key-0002"
LIMITS = {
    "req": {"rate": "6/h", "burst": 4},
    "tok": {"rate": "6000/h", "burst": 3000, "unit": "tokens", "max_cost": 1000},
    "share": {"rate": "6/h", "burst": 3, "per": ["api_key", "agent_id"]},
    "beta": {"rate": "1/h", "burst": 1, "mode": "shadow"},
    "everyone": {"rate": "1000/h", "burst": 1000, "per": []},
}


def _app(server: RedisServer, **conf: Any) -> tuple[Celery, throttle.Throttle, Any]:
    app = make_app(
        server,
        throttle_limits=LIMITS,
        throttle_tiers={"gold": {"req": {"rate": "60/h"}}},
        throttle_tier_resolver=lambda identity: (
            "gold" if identity.get("api_key") == OTHER_RAW else None
        ),
        **conf,
    )
    ext = throttle.Throttle(app)

    @app.task(
        name=f"{app.main}.step",
        throttle=["req", "tok", "share", "beta", "everyone"],
        throttle_cost={"tok": 500},
    )
    def step(*, api_key: str, agent_id: str) -> None:
        pass

    return app, ext, step


def _decide(ext: throttle.Throttle, step: Any, api_key: str, agent_id: str, n: int) -> list[str]:
    """Decide ``n`` fresh messages through the gate, as a worker would; the actions taken."""
    actions = []
    for _ in range(n):
        kwargs = {"api_key": api_key, "agent_id": agent_id}
        verdict = ext.gate.check(step, str(uuid.uuid4()), (), kwargs, {})
        actions.append(verdict.action.value)
    return actions


def _run(app: Celery, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), obj=CLIContext(app, True, None), input=input)


def _json(app: Celery, *args: str) -> Any:
    result = _run(app, *args, "--json")
    assert result.exit_code == 0, result.output
    assert RAW not in result.output
    assert OTHER_RAW not in result.output
    return json.loads(result.output)


def test_status_lists_limits_busiest_keys_and_workers(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """status shows every tier's limits, the factor, the busiest keys by fingerprint with what
    the gate counted, their tokens left, bookings and next free slot, and the live workers."""
    app, ext, step = _app(redis_server)
    assert _decide(ext, step, RAW, "a1", 6) == ["run"] * 3 + ["defer"] * 3  # share: burst 3
    assert _decide(ext, step, OTHER_RAW, "a1", 1) == ["run"]
    ext.flush_counts()
    sample = Sample("w1@host", cpu=12.5, memory=40.0, busy=0.5)
    ext.store().record_sample("w1@host", sample.to_json(), max_age=60)

    found = _json(app, "status", "--top", "5")
    assert found["factor"] == {"in_force": 1.0, "computed": 1.0, "override": None}
    assert {(r["tier"], r["limit"], r["rate"]) for r in found["limits"]} >= {
        ("default", "req", "6/h"),
        ("gold", "req", "60/h"),
    }
    fp = ext.keyspace.fingerprint("api_key", RAW)
    first, second = found["keys"]
    assert first["key"] == fp
    assert first["tier"] == "default"
    assert first["admitted_per_minute"] == pytest.approx(3 / 5)
    assert first["deferred_share"] == pytest.approx(0.5)
    assert first["bookings"] == 3  # each deferral booked a slot of "share"
    left = {s["limit"]: s for s in first["limits"]}
    assert set(left) == {"req", "tok", "beta"}  # keyed by the API key alone
    assert 1 <= left["req"]["remaining"] < 1.01
    assert 1500 <= left["tok"]["remaining"] < 1510
    assert first["next_free_s"] == 0  # req and tok still have room; beta is a shadow limit
    assert second["key"] == ext.keyspace.fingerprint("api_key", OTHER_RAW)
    assert second["tier"] == "gold"
    assert found["workers"] == [
        {"worker": "w1@host", "cpu": 12.5, "memory": 40.0, "busy": 0.5, "signals": {}}
    ]
    text = _run(app, "status")
    assert text.exit_code == 0
    assert fp in text.output
    assert "w1@host" in text.output
    assert RAW not in text.output


def test_inspect_shows_one_identity_and_never_the_key(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """inspect fingerprints the key locally and shows each limit's tokens left and next free
    slot; an agent limit without --agent-id counts that key's agent buckets instead."""
    app, ext, step = _app(redis_server)
    _decide(ext, step, RAW, "a1", 3)
    _decide(ext, step, RAW, "a2", 1)
    found = _json(app, "inspect", "--api-key", RAW)
    assert found["key"] == ext.keyspace.fingerprint("api_key", RAW)
    assert found["tier"] == "default"
    rows = {r["limit"]: r for r in found["limits"]}
    assert 0 <= rows["req"]["remaining"] < 0.01
    assert 599 < rows["req"]["next_free_s"] <= 600  # one unit at 6/h: 600 s
    assert rows["share"]["missing"] == ["agent_id"]
    assert rows["share"]["buckets"] == 2
    assert rows["everyone"]["remaining"] == pytest.approx(996, abs=0.1)
    agent = _json(app, "inspect", "--api-key", RAW, "--agent-id", "a1")
    rows = {r["limit"]: r for r in agent["limits"]}
    assert 0 <= rows["share"]["remaining"] < 0.01
    assert agent["agent"] == ext.keyspace.fingerprint("agent_id", "a1")
    gold = _json(app, "inspect", "--api-key", OTHER_RAW)
    assert gold["tier"] == "gold"
    assert {r["limit"]: r["rate"] for r in gold["limits"]}["req"] == "60/h"


def test_reset_refills_one_key_and_asks_first(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """reset asks for confirmation (no: nothing changes, exit 1), then refills every limit of
    one key, for all its agents, and leaves other keys and the global limit as they were."""
    app, ext, step = _app(redis_server)
    _decide(ext, step, RAW, "a1", 3)
    _decide(ext, step, RAW, "a2", 1)
    _decide(ext, step, OTHER_RAW, "a1", 2)
    refused = _run(app, "reset", "--api-key", RAW, input="n\n")
    assert refused.exit_code == 1
    assert "nothing reset" in refused.output
    assert _decide(ext, step, RAW, "a3", 1) == ["defer"]  # req is still empty
    done = _json(app, "reset", "--api-key", RAW, "--yes")
    assert done["deleted"] >= 4  # req, tok, beta and the agents' share buckets
    assert "everyone" not in done["limits"]
    assert _decide(ext, step, RAW, "a1", 3) == ["run"] * 3
    other = _json(app, "inspect", "--api-key", OTHER_RAW)
    assert {r["limit"]: r for r in other["limits"]}["tok"]["remaining"] < 2001
    assert {r["limit"]: r for r in other["limits"]}["everyone"]["remaining"] < 994
    one = _json(app, "reset", "--api-key", RAW, "--limit", "share", "--agent-id", "a1", "--yes")
    assert one == {"key": done["key"], "limits": ["share"], "deleted": 1}
    # An agent alone: only the limits keyed by agent, for that agent; the key's stay drained.
    before = {
        r["limit"]: r["remaining"]
        for r in _json(app, "inspect", "--api-key", RAW)["limits"]
        if "remaining" in r
    }
    agent = _json(app, "reset", "--api-key", RAW, "--agent-id", "a1", "--yes")
    assert agent["limits"] == ["share"]
    after = {
        r["limit"]: r["remaining"]
        for r in _json(app, "inspect", "--api-key", RAW)["limits"]
        if "remaining" in r
    }
    assert after["req"] == pytest.approx(before["req"], abs=0.01)
    refused = _run(app, "reset", "--api-key", RAW, "--limit", "req", "--agent-id", "a1", "--yes")
    assert refused.exit_code == 1
    assert "not keyed by agent" in refused.output


def test_factor_shows_sets_and_clears_the_override(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """factor with no value shows the load factor; 0.5 overrides it; clear removes that."""
    app, _, _ = _app(redis_server)
    assert _json(app, "factor")["in_force"] == 1.0
    assert _json(app, "factor", "0.5") == {"in_force": 0.5, "computed": 1.0, "override": 0.5}
    assert _json(app, "factor")["override"] == 0.5
    assert _json(app, "factor", "clear")["override"] is None


def test_suggest_proposes_limits_from_the_peak_and_flags_tight_ones(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """suggest turns the gate's counts into each key's peak per minute under each limit, a limit
    at 2.5x that peak rounded up, flags the limit that deferred most of a key's work (not one
    an agent's share deferred), and shows what the shadow limit would have denied."""
    app, ext, step = _app(redis_server)
    for i in range(10):  # ten agents: req (burst 4) runs 4 and defers 6
        _decide(ext, step, RAW, f"a{i}", 1)
    _decide(ext, step, OTHER_RAW, "a1", 4)  # share (burst 3) runs 3 and defers 1
    ext.flush_counts()
    found = _json(app, "suggest", "--minutes", "5")
    rows = {(r["key"], r["limit"]): r for r in found["rows"]}
    fp = ext.keyspace.fingerprint("api_key", RAW)
    req, tok = rows[(fp, "req")], rows[(fp, "tok")]
    assert req["peak_per_minute"] == 4
    assert req["configured_per_minute"] == pytest.approx(0.1)
    assert req["proposed_per_minute"] == 10  # 2.5 x 4
    assert req["deferred_share"] == pytest.approx(6 / 10)
    assert req["too_tight"] is True
    assert tok["peak_per_minute"] == 2000  # 4 admissions of 500 tokens, all in one minute
    assert tok["proposed_per_minute"] == 5000  # 2.5 x 2000, rounded up
    assert tok["configured_per_minute"] == 100
    assert tok["deferred_share"] == 0
    assert tok["too_tight"] is False
    beta = rows[(fp, "beta")]
    assert beta["mode"] == "shadow"
    assert beta["would_deny"] == 3  # burst 1: every run after the first would have waited
    gold = rows[(ext.keyspace.fingerprint("api_key", OTHER_RAW), "req")]
    assert gold["tier"] == "gold"
    assert gold["configured_per_minute"] == 1
    assert gold["too_tight"] is False  # its deferral was the agent share's
    assert _json(app, "suggest", "--minutes", "5", "--top", "1")["rows"][0]["key"] == fp
    assert "too tight" in _run(app, "suggest", "--minutes", "5").output


def test_errors_are_one_line_with_exit_code_1(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """An unknown limit, a bad factor, a window longer than the counts kept, counts turned
    off and a store that does not answer each give one line on stderr and exit code 1."""
    app, _, _ = _app(redis_server)
    for args, says in (
        (["reset", "--api-key", RAW, "--limit", "nope", "--yes"], "unknown limit 'nope'"),
        (["reset", "--api-key", RAW, "--limit", "everyone", "--yes"], "not keyed by API key"),
        (["factor", "2"], "a number in (0, 1] or 'clear'"),
        (["suggest", "--minutes", "61"], "1 to 60"),
        (["inspect", "--api-key", RAW, "--tier", "platinum"], "unknown tier 'platinum'"),
    ):
        result = _run(app, *args)
        assert result.exit_code == 1, (args, result.output)
        assert says in result.output
        assert len(result.output.strip().splitlines()) == 1
    short, _, _ = _app(redis_server, throttle_counts_retention=120)
    assert _json(short, "status")["minutes"] == 2  # the default window fits the counts kept
    off, _, _ = _app(redis_server, throttle_counts_retention=0)
    result = _run(off, "suggest")
    assert result.exit_code == 1
    assert "throttle_counts_retention" in result.output
    with socket.socket() as holder:  # a port nobody answers on
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        down, _, _ = _app(redis_server, throttle_redis_url=f"redis://:pw@127.0.0.1:{port}/0")
        result = _run(down, "status")
    assert result.exit_code == 1
    assert "did not answer" in result.output
    assert "pw" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_celery_command_has_the_throttle_subcommands(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """The installed `celery` command finds `throttle` through its entry point, and its
    status runs against a real app module and prints JSON; a store that is down exits 1."""
    base = redis_server.url.rsplit("/", 1)[0]
    env = {
        **os.environ,
        "THROTTLE_TEST_BROKER": f"{base}/1",
        "THROTTLE_TEST_BACKEND": f"{base}/2",
        "THROTTLE_TEST_STORE": f"{base}/0",
        "THROTTLE_TEST_CONF": json.dumps({"throttle_limits": DEFAULT_LIMITS}),
    }

    def celery(*args: str, store: str | None = None) -> subprocess.CompletedProcess[str]:
        run_env = env if store is None else {**env, "THROTTLE_TEST_STORE": store}
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.workerapp", "throttle", *args],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    helped = celery("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("status", "inspect", "reset", "factor", "suggest"):
        assert command in helped.stdout
    status = celery("status", "--json")
    assert status.returncode == 0, status.stderr
    assert {r["limit"] for r in json.loads(status.stdout)["limits"]} == {"per-key", "per-agent"}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        down = celery("status", store=f"redis://127.0.0.1:{port}/0")
    assert down.returncode == 1
    assert down.stderr.strip().count("\n") == 0
    assert "did not answer" in down.stderr


def test_counts_are_bounded_and_survive_a_failed_flush(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """A tally past its key limit counts the rest as ~other; counts a store could not take
    are kept for the next flush; the store's tallies parse back per key."""
    tally = Tally(max_keys=2)
    for key in ("a", "b", "c", "d"):
        tally.admitted(key, {"req": 1}, "default")
    tally.deferred("d", "req")
    counts = tally.take()
    assert counts["~other|a"] == 2
    assert counts["~other|d"] == 1
    assert counts["~other|d|req"] == 1
    tally.give_back(counts)
    _, ext, _ = _app(redis_server)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        _, down, _ = _app(redis_server, throttle_redis_url=f"redis://127.0.0.1:{port}/0")
        tally.flush(down.store(), 3600)
    assert tally.take() == counts  # kept
    tally.give_back(counts)
    tally.flush(ext.store(), 3600)
    found = traffic(ext.store().counts(1))
    assert sum(found["~other"].admitted) == 2
    assert found["a"].units == {"req": [1.0]}
    assert found["a"].tier == "default"
