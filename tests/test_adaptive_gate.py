# SPDX-License-Identifier: MIT
"""Adaptive limits in Celery: the load policy with injected samples and an injected clock, the
settings, the provider's 429s turned into deferrals in a real worker (against a simulated
provider on loopback), the control commands, and eager mode."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

import throttle
from tests.conftest import SECRET, T0, TIMEOUT, events_of, make_app
from tests.provider import Provider
from tests.redis_servers import RedisServer
from throttle import ConfigurationError, Keyspace, Limit, MemoryStore, signals
from throttle.adaptive import UpstreamThrottled
from throttle.adaptive.policy import LoadPolicy, Sample
from throttle.adaptive.sampler import LoadSampler
from throttle.celeryext.counts import traffic
from throttle.celeryext.settings import load_settings
from throttle.testing import ManualClock

US = 1_000_000


def sample(cpu: float = 10, memory: float = 10, worker: str = "w", **signals: float) -> Sample:
    return Sample(worker, cpu, memory, 0.0, signals)


@pytest.mark.parametrize(
    ("cpu", "memory", "factor"),
    [
        (95, 10, 0.25),
        (90, 10, 0.5),
        (80, 10, 0.5),
        (75.5, 10, 0.5),
        (65, 10, 0.75),
        (60, 0, 1.0),
        (10, 91, 0.25),
        (80, 95, 0.25),
        (0, 0, 1.0),
    ],
)
def test_default_policy_ladders(cpu: float, memory: float, factor: float) -> None:
    """Above 90% CPU 0.25, above 75% 0.5, above 60% 0.75, else 1.0; memory alike; the lower
    of the two wins."""
    assert LoadPolicy().target([sample(cpu, memory)]) == factor


def test_the_hottest_live_worker_and_custom_signals_decide() -> None:
    """The hottest worker per signal counts; custom signals use their own ladder; no samples
    means no load."""
    policy = LoadPolicy()
    assert policy.target([sample(20), sample(92, worker="hot")]) == 0.25
    assert policy.target([sample(db_pool=0.8), sample(db_pool=0.3, worker="x")]) == 0.5
    assert policy.target([sample(70, p95=0.95)]) == 0.25
    assert policy.target([]) == 1.0
    busy = LoadPolicy(busy=((0.99, 0.5),))
    assert busy.target([Sample("w", 0, 0, 1.0, {})]) == 0.5


def test_policy_settings_are_checked() -> None:
    """Bad ladders and factors name the field of throttle_adaptive."""
    good = LoadPolicy.from_settings({"cpu": [[50, 0.5], [80, 0.2]], "floor": 0.05}, "x")
    assert good.cpu == ((80.0, 0.2), (50.0, 0.5))
    assert good.floor == 0.05
    for bad, field in (
        ({"cpu": [[150, 0.5]]}, "x.cpu"),
        ({"memory": [[50, 0]]}, "x.memory"),
        ({"busy": "high"}, "x.busy"),
        ({"signal_thresholds": [[2, 0.5]]}, "x.signal_thresholds"),
        ({"floor": 0}, "x.floor"),
        ({"step": 1.5}, "x.step"),
        ({"relax": -1}, "x.relax"),
    ):
        with pytest.raises(ConfigurationError, match=field.replace(".", r"\.")):
            LoadPolicy.from_settings(bad, "x")


def test_sampler_rounds_move_one_shared_factor(keyspace: Keyspace) -> None:
    """Two workers' samplers with injected readings and clock: the hottest decides, the factor
    falls at once and rises one step per relax period, and a worker that stops reporting drops
    out after three intervals."""
    clock = ManualClock(T0)
    store = MemoryStore(keyspace, clock=clock)
    readings = {"a": 95.0, "b": 10.0}
    policy = LoadPolicy(relax=5.0, step=0.25)

    def sampler(name: str) -> LoadSampler:
        return LoadSampler(
            lambda: store,
            name,
            policy,
            interval=1.0,
            cpu=lambda: readings[name],
            memory=lambda: 20.0,
        )

    a, b = sampler("a"), sampler("b")
    assert a.tick(now_us=T0) is not None
    factor = b.tick(now_us=T0)
    assert factor is not None
    assert factor.in_force == 0.25  # a is hot
    assert {s.worker for s in b.cluster} == {"a", "b"}
    readings["a"] = 10.0
    for second in range(1, 5):  # cool again, but it rises only after 5 s
        assert a.tick(now_us=T0 + second * US).in_force == 0.25  # type: ignore[union-attr]
    assert b.tick(now_us=T0 + 5 * US).in_force == 0.5  # type: ignore[union-attr]
    readings["a"] = 99.0
    # a stops reporting while hot: after 3 intervals its sample is gone, and b alone decides.
    assert b.tick(now_us=T0 + 6 * US).in_force == 0.5  # type: ignore[union-attr]
    a.tick(now_us=T0 + 6 * US)
    assert b.tick(now_us=T0 + 7 * US).in_force == 0.25  # type: ignore[union-attr]
    assert [s.worker for s in b.cluster] == ["a", "b"]
    # 4 s after a's last report its sample is gone; the factor rises only at T0 + 12 s.
    assert b.tick(now_us=T0 + 10 * US).in_force == 0.25  # type: ignore[union-attr]
    assert [s.worker for s in b.cluster] == ["b"]
    assert b.tick(now_us=T0 + 12 * US).in_force == 0.5  # type: ignore[union-attr]


def test_a_failing_signal_is_left_out() -> None:
    """A custom signal that raises or gives NaN is skipped for the round; others stand."""

    def broken() -> float:
        raise RuntimeError("pool gone")

    sampler = LoadSampler(
        lambda: MemoryStore(Keyspace(SECRET)),
        "w",
        LoadPolicy(),
        cpu=lambda: 50.0,
        memory=lambda: float("nan"),
        signals={"db": broken, "queue": lambda: 7.0, "nan": lambda: float("nan")},
    )
    taken = sampler.sample()
    assert (taken.cpu, taken.memory, dict(taken.signals)) == (50.0, 0.0, {"queue": 1.0})


def test_adaptive_settings_are_checked(redis_server: RedisServer) -> None:
    """throttle_adaptive and the per-limit adaptive and upstream keys are validated, naming
    the key."""
    ok = make_app(
        redis_server,
        throttle_limits={"llm": {"rate": "10/s", "upstream": "requests", "adaptive": False}},
        throttle_adaptive={"cpu": [[80, 0.5]], "signals": {"q": "os:getpid"}},
        throttle_load_interval=0.5,
    )
    settings = load_settings(ok.conf)
    assert settings.policy("llm").upstream == "requests"
    assert settings.policy("llm").limit.adaptive is False
    assert settings.adaptive.interval == 0.5
    assert settings.adaptive.policy.cpu == ((80.0, 0.5),)
    for conf, key in (
        ({"throttle_adaptive": {"nope": 1}}, "throttle_adaptive.nope"),
        ({"throttle_adaptive": {"enabled": "yes"}}, "throttle_adaptive.enabled"),
        ({"throttle_adaptive": {"upstream_decrease": 2}}, "throttle_adaptive.upstream_decrease"),
        ({"throttle_adaptive": {"signals": {"q": "no.such.module:f"}}}, "signals"),
        ({"throttle_adaptive": []}, "throttle_adaptive"),
        ({"throttle_load_interval": 0}, "throttle_load_interval"),
        ({"throttle_limits": {"l": {"rate": "1/s", "upstream": 5}}}, "upstream"),
        ({"throttle_limits": {"l": {"rate": "1/s", "adaptive": "no"}}}, "adaptive"),
    ):
        with pytest.raises(ConfigurationError, match=key.replace(".", r"\.").replace("[", r"\[")):
            load_settings(make_app(redis_server, **conf).conf)


def test_provider_429s_defer_tasks_and_slow_the_tenant(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    worker: Callable[[Celery], Any],
    record: Callable[[Any], list[dict[str, Any]]],
) -> None:
    """Tasks calling a simulated provider of capacity 2/s (through httpx) above its capacity:
    each 429 defers its task by the provider's Retry-After instead of failing it; every task
    succeeds exactly once with its retry budget untouched (max_retries=0); the tenant's
    upstream factor fell below 1."""
    app = make_app(
        redis_server,
        throttle_limits={"llm": {"rate": "100/s", "burst": 100, "upstream": "requests"}},
        throttle_max_defer=3.0,
    )
    ext = throttle.Throttle(app)
    deferred = record(signals.task_throttled)

    with Provider(capacity=2) as provider:

        @app.task(bind=True, name=f"{app.main}.call", throttle=["llm"], max_retries=0)
        def call(self: Any, i: int, *, api_key: str) -> int:
            answer = httpx.post(provider.url, headers={"x-api-key": api_key}, json={"i": i})
            answer.raise_for_status()
            redis_client.rpush("done", f"{self.request.id}:{self.request.retries}")
            return i

        worker(app)
        results = [call.delay(i, api_key="tenant") for i in range(6)]
        assert [r.get(timeout=TIMEOUT) for r in results] == list(range(6))
        assert provider.count("tenant", 429) >= 1
    done = [x.decode() for x in redis_client.lrange("done", 0, -1)]
    assert sorted(d.split(":")[0] for d in done) == sorted(r.id for r in results)
    assert all(d.endswith(":0") for d in done)
    upstream = [d for d in deferred if d["reason"] == "upstream"]
    assert len(upstream) == provider.count("tenant", 429)
    assert all(d["countdown"] >= 1.0 for d in upstream)  # Retry-After is at least 1 s
    assert all(d["key"] != "tenant" for d in upstream)  # a fingerprint, never the raw key
    # Each 429 halved the tenant's factor; six successes at +0.05 cannot bring it back to 1.
    tag = ext.keyspace.tenant_tag({"api_key": "tenant"})
    factor = redis_client.get(ext.keyspace.upstream_key(tag))
    assert factor is not None
    assert float(factor) < 1.0


def test_upstream_throttled_pauses_the_named_limit_for_every_worker(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    worker: Callable[[Celery], Any],
) -> None:
    """A task raising UpstreamThrottled(retry_after=30, limits=["llm"]): the tenant's llm
    bucket is paused (a direct admission is told to wait about 30 s) and its factor halved."""
    app = make_app(redis_server, throttle_limits={"llm": {"rate": "100/s", "burst": 100}})
    ext = throttle.Throttle(app)
    announced = threading.Event()
    reasons: list[str] = []

    def on_throttled(**fields: Any) -> None:
        reasons.append(fields["reason"])
        announced.set()

    signals.task_throttled.connect(on_throttled, weak=False)

    @app.task(name=f"{app.main}.once", throttle=["llm"])
    def once(*, api_key: str) -> None:
        if not redis_client.set("raised", 1, nx=True):
            return
        raise UpstreamThrottled(retry_after=30, limits=["llm"])

    try:
        worker(app)
        result = once.delay(api_key="tenant")
        assert announced.wait(TIMEOUT)  # announced once the store has taken the pause
    finally:
        signals.task_throttled.disconnect(on_throttled)
    assert reasons[0] == "upstream"
    store = ext.store()
    limit = ext.settings.policy("llm").limit
    decision = store.admit([limit], {"api_key": "tenant"}, adaptive=True)
    assert not decision.allowed
    assert 25 < decision.retry_after <= 30.02
    # Halved once; successes do not raise it while the episode (the 30 s delay) lasts.
    assert store.upstream_ok({"api_key": "tenant"}, successes=1, step=0.01) == 0.5
    assert result.state in ("PENDING", "RECEIVED")  # deferred, not failed


def test_a_429_deferral_sends_its_event_from_the_pool(
    redis_server: RedisServer, redis_client: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A deferral for the provider's 429, decided in the pool process, still sends a
    task-throttled event (reason upstream, the key's fingerprint), which Flower and the demo's
    live view read."""
    app = make_app(
        redis_server,
        throttle_limits={"llm": {"rate": "100/s", "burst": 100}},
        worker_send_task_events=True,
    )
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.once", throttle=["llm"])
    def once(*, api_key: str) -> str:
        if redis_client.set("raised", 1, nx=True):
            raise UpstreamThrottled(retry_after=0.2)
        return "ran"

    with events_of(app, "task-throttled", 1) as events:
        worker(app)
        result = once.delay(api_key="sk-raw-tenant")
        assert result.get(timeout=TIMEOUT) == "ran"
    (event,) = events
    assert event["uuid"] == result.id
    assert event["reason"] == "upstream"
    assert event["key"] == ext.keyspace.fingerprint("api_key", "sk-raw-tenant")
    assert "sk-raw-tenant" not in repr(event)
    # Counted for `celery throttle suggest`, by the pool side itself.
    found = traffic(ext.store().counts(2))
    assert found[event["key"]].deferred_by == {"llm": 1.0}


def test_control_commands(redis_server: RedisServer, worker: Callable[[Celery], Any]) -> None:
    """control throttle_factor sets and clears the cluster-wide factor; inspect
    throttle_status shows it with this worker's sample."""
    app = make_app(
        redis_server, throttle_limits={"llm": {"rate": "10/s"}}, throttle_load_interval=0.2
    )
    throttle.Throttle(app)
    worker(app)
    # Wait until the worker's control channel answers (start_worker does not ping here).
    assert any(app.control.ping(timeout=0.5) for _ in range(60))
    replies = app.control.broadcast(
        "throttle_factor", arguments={"value": "0.5"}, reply=True, timeout=5, limit=1
    )
    assert replies
    assert all(r[next(iter(r))]["ok"]["in_force"] == 0.5 for r in replies)
    status = app.control.broadcast("throttle_status", reply=True, timeout=5, limit=1)
    assert len(status) == 1
    (only,) = status[0].values()
    assert only["factor"]["override"] == 0.5
    assert only["adaptive"] is True
    bad = app.control.broadcast(
        "throttle_factor", arguments={"value": "2"}, reply=True, timeout=5, limit=1
    )
    assert "error" in bad[0][next(iter(bad[0]))]
    cleared = app.control.broadcast(
        "throttle_factor", arguments={"value": "clear"}, reply=True, timeout=5, limit=1
    )
    assert cleared[0][next(iter(cleared[0]))]["ok"]["override"] is None


def eager_app(redis_server: RedisServer, **conf: Any) -> tuple[Celery, list[float]]:
    """An eager app on an in-process store whose clock moves only when the app sleeps; the
    list records every sleep."""
    app = make_app(
        redis_server,
        throttle_limits={"llm": {"rate": "100/s", "burst": 100}},
        task_always_eager=True,
        **conf,
    )
    clock = ManualClock(T0)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    store = MemoryStore(Keyspace(SECRET), clock=clock)
    throttle.Throttle(app, store=store, clock=clock, sleep=sleep)
    return app, waits


def flaky_task(app: Celery, failures: int) -> tuple[Any, list[int]]:
    """A task throttled by ``llm`` whose first ``failures`` calls get a 429 (Retry-After 2 s)
    from the provider, and the list its calls are counted in."""
    calls: list[int] = []

    @app.task(name=f"{app.main}.flaky", throttle=["llm"])
    def flaky(*, api_key: str) -> str:
        calls.append(1)
        if len(calls) <= failures:
            request = httpx.Request("POST", "http://127.0.0.1:9/")
            response = httpx.Response(429, headers={"retry-after": "2"}, request=request)
            response.raise_for_status()
        return "ok"

    return flaky, calls


def test_eager_mode_waits_out_the_provider(redis_server: RedisServer) -> None:
    """In eager mode a 429 waits (through the injected sleep) for the provider's delay, then
    the task is admitted and run again."""
    app, waits = eager_app(redis_server, throttle_max_defer=5.0)
    flaky, calls = flaky_task(app, failures=1)
    assert flaky.delay(api_key="k").get() == "ok"
    assert len(calls) == 2
    assert waits[0] == 2.0


def test_eager_mode_waits_out_the_provider_again_and_again(redis_server: RedisServer) -> None:
    """Three 429s in a row: each waits and runs the task again, to success (the new copy's
    token is recorded as it is: no denial recorded a hand-over to complete)."""
    app, waits = eager_app(redis_server, throttle_max_defer=5.0)
    flaky, calls = flaky_task(app, failures=3)
    assert flaky.delay(api_key="k").get() == "ok"
    assert len(calls) == 4
    assert waits[:3] == [2.0, 2.0, 2.0]


def test_a_limit_that_opts_out_ignores_the_load() -> None:
    """An admin-tier style limit with adaptive=False keeps its full burst under a 0.25 factor;
    the adaptive one gets a quarter."""
    store = MemoryStore(Keyspace(SECRET), clock=ManualClock(T0))
    store.override_load_factor(0.25)
    fixed = Limit("admin", "8/s", burst=8, adaptive=False)
    moving = Limit("agent", "8/s", burst=8, per=["api_key", "agent_id"])
    who = {"api_key": "k", "agent_id": "a"}
    assert sum(store.admit([fixed], who, adaptive=True).allowed for _ in range(10)) == 8
    assert sum(store.admit([moving], who, adaptive=True).allowed for _ in range(10)) == 2


def test_the_sampler_stops_with_its_worker(redis_server: RedisServer) -> None:
    """When an in-process worker ends (it terminates rather than stops its steps), its load
    sampler thread ends with it instead of reporting for ever."""
    from celery.contrib.testing.worker import start_worker

    app = make_app(redis_server, throttle_limits={"llm": {"rate": "10/s"}})
    ext = throttle.Throttle(app)
    with start_worker(app, perform_ping_check=False, pool="threads", concurrency=1):
        assert ext.sampler is not None
        thread = ext.sampler._thread
        assert thread is not None
        assert thread.is_alive()
    assert not thread.is_alive()


def test_report_upstream_brings_the_bucket_down(
    redis_server: RedisServer, redis_client: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A task reports a successful answer's headers: its limit with upstream="requests"
    follows the provider's remaining count down, for the whole tenant. (The load factor is
    off: this machine's own load would tighten the count further.)"""
    app = make_app(
        redis_server,
        throttle_limits={"llm": {"rate": "10/m", "burst": 10, "upstream": "requests"}},
        throttle_adaptive={"cpu": [], "memory": []},
    )
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.call", throttle=["llm"])
    def call(*, api_key: str) -> float:
        said = throttle.report_upstream({"x-ratelimit-remaining-requests": "2"})
        return said.remaining["requests"]

    worker(app)
    assert call.delay(api_key="tenant").get(timeout=TIMEOUT) == 2
    store, limit = ext.store(), ext.settings.policy("llm").limit
    allowed = [store.admit([limit], {"api_key": "tenant"}, adaptive=True).allowed for _ in range(4)]
    assert allowed == [True, True, False, False]
    with pytest.raises(throttle.ThrottleError, match="inside a running task"):
        throttle.report_upstream({})


def test_a_task_calling_itself_gets_the_providers_error(redis_server: RedisServer) -> None:
    """A task that calls itself as a plain function inside its own run gets the provider's
    429 from that call as an exception: it is not taken for the task's own call (nothing is
    waited for or deferred on its behalf)."""
    app, waits = eager_app(redis_server, throttle_max_deferrals=2)

    @app.task(name=f"{app.main}.nested", throttle=["llm"])
    def nested(depth: int, *, api_key: str) -> str:
        if depth == 0:
            try:
                nested(1, api_key=api_key)
            except httpx.HTTPStatusError:
                return "the inner call raised"
            return "the inner call returned"
        request = httpx.Request("POST", "http://127.0.0.1:9/")
        httpx.Response(429, headers={"retry-after": "2"}, request=request).raise_for_status()
        return "unreachable"

    assert nested.delay(0, api_key="k").get() == "the inner call raised"
    assert waits == []
