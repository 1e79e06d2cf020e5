# SPDX-License-Identifier: MIT
"""The Celery gate in one process: a real worker (``start_worker``) on the private Redis as
broker, result backend and store. Timing never decides a count here: tests wait on results."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.signals import task_postrun

import throttle
from tests.conftest import SECRET, TIMEOUT, events_of, make_app
from tests.redis_servers import RedisServer
from throttle import signals
from throttle.celeryext import headers as H
from throttle.testing import ManualClock

OLDER, NEWER = "00000000000000aa", "00000000000000bb"  # deferral tokens are 16 hex digits


@pytest.fixture
def db(redis_client: redis.Redis) -> redis.Redis:
    """The store database (db 0), emptied with all others before the test."""
    return redis_client


def test_deferred_tasks_run_once_in_order_with_no_retries_used(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Twenty tasks against 10/s burst 2 all succeed, each body sees retries == 0 even with
    max_retries=0, and every task id runs exactly once."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "10/s", "burst": 2}})
    throttle.Throttle(app)

    @app.task(bind=True, name=f"{app.main}.step", throttle=["req"], max_retries=0)
    def step(self: Any, i: int, *, api_key: str) -> int:
        db.rpush("runs", f"{self.request.id}:{self.request.retries}")
        return i

    worker(app)
    results = [step.delay(i, api_key="k") for i in range(20)]
    assert [r.get(timeout=TIMEOUT) for r in results] == list(range(20))
    runs = [x.decode() for x in db.lrange("runs", 0, -1)]
    assert len(runs) == 20
    assert {r.split(":")[0] for r in runs} == {r.id for r in results}
    assert all(r.endswith(":0") for r in runs)


def test_a_task_sees_when_the_store_admitted_it(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """The admission header a task's request carries says when the store admitted it, on the
    store's clock: for a task let through at once and for one deferred to its slot, between
    its sending and its run."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "5/s", "burst": 1}})
    throttle.Throttle(app)

    @app.task(bind=True, name=f"{app.main}.when", throttle=["req"])
    def when(self: Any, *, api_key: str) -> tuple[float, float]:
        seconds, micros = db.time()
        return getattr(self.request, H.ADMITTED)["at"], seconds + micros / 1e6

    worker(app)
    seconds, micros = db.time()
    sent = seconds + micros / 1e6
    results = [when.delay(api_key="k") for _ in range(2)]
    (first, ran_first), (second, ran_second) = sorted(r.get(timeout=TIMEOUT) for r in results)
    assert sent <= first <= ran_first
    assert first + 0.2 <= second <= ran_second  # the later one waited for its slot (1 / 5 s)


def test_one_task_deferred_many_times_keeps_its_retry_budget(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    record: Callable[[Any], list[dict[str, Any]]],
) -> None:
    """A max_retries=0 task whose slot is 2.5 s away, with deferrals capped at 0.5 s, comes back
    five times and succeeds; the deferral count travels in its headers."""
    app = make_app(redis_server, throttle_limits={"slow": {"rate": "24/m", "burst": 1}})
    throttle.Throttle(app)
    seen = record(signals.task_throttled)

    @app.task(bind=True, name=f"{app.main}.step", throttle="slow", max_retries=0)
    def step(self: Any, *, api_key: str) -> int:
        return int(getattr(self.request, H.DEFERRALS, 0) or 0)

    worker(app)
    assert step.delay(api_key="k").get(timeout=TIMEOUT) == 0
    deferrals = step.delay(api_key="k").get(timeout=TIMEOUT)
    assert deferrals >= 5
    mine = [kw for kw in seen if kw["sender"].name == step.name]
    assert [kw["deferrals"] for kw in mine][-deferrals:] == list(range(1, deferrals + 1))
    assert {kw["reason"] for kw in mine} <= {"booked", "early"}
    assert all(kw["countdown"] <= 0.5 for kw in mine)


def test_canvas_survives_deferrals(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Chains, chords, groups, link and link_error give the right results through deferrals."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "20/s", "burst": 1}})
    throttle.Throttle(app)

    @app.task(name=f"{app.main}.add", throttle="req")
    def add(x: int, y: int, *, api_key: str = "k") -> int:
        return x + y

    @app.task(name=f"{app.main}.total", throttle="req")
    def total(values: list[int], *, api_key: str = "k") -> int:
        return sum(values)

    @app.task(name=f"{app.main}.boom", throttle="req")
    def boom(*, api_key: str = "k") -> None:
        raise ValueError("boom")

    @app.task(name=f"{app.main}.note")
    def note(*args: Any, **kwargs: Any) -> None:
        db.rpush("notes", repr(args[:1]))

    worker(app)
    assert chain(add.s(1, 2), add.s(3), add.s(4)).delay().get(timeout=TIMEOUT) == 10
    assert chord([add.s(i, i) for i in range(5)], total.s()).delay().get(timeout=TIMEOUT) == 20
    assert group(add.s(i, 1) for i in range(5)).delay().get(timeout=TIMEOUT) == [1, 2, 3, 4, 5]
    assert add.apply_async((2, 2), link=note.s()).get(timeout=TIMEOUT) == 4
    failed = boom.apply_async(link_error=note.si("errback"))
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=TIMEOUT)
    notes = set()
    for _ in range(2):  # the callbacks run asynchronously: wait for both, then check
        _, value = db.blpop(["notes"], timeout=TIMEOUT) or (None, b"")
        notes.add(value.decode())
    assert notes == {"(4,)", "('errback',)"}


def test_a_stale_twin_is_dropped(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A copy of deferred work that is not the live one (as a crash between publishing and
    acknowledging leaves) is acknowledged and dropped; the task body runs once."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "10/s", "burst": 10}})
    ext = throttle.Throttle(app)

    @app.task(bind=True, name=f"{app.main}.step", throttle="req")
    def step(self: Any, *, api_key: str) -> None:
        db.rpush("runs", self.request.id)

    # Record a live token for the work, as if a newer copy had been published: the "older"
    # message is then a stale twin. The solo pool decides and runs messages in arrival order,
    # so once the newer copy has run, the older one has been decided.
    worker(app, pool="solo", concurrency=1)
    limits = [ext.settings.policy("req").limit]
    ext.store().set_guard(
        limits, {"api_key": "k", "tier": "default"}, throttle.store.Guard("twin-1", NEWER), ttl=60
    )
    step.apply_async(kwargs={"api_key": "k"}, task_id="twin-1", headers={H.TOKEN: OLDER})
    step.apply_async(kwargs={"api_key": "k"}, task_id="twin-1", headers={H.TOKEN: NEWER})
    assert app.AsyncResult("twin-1").get(timeout=TIMEOUT) is None
    runs = [x.decode() for x in db.lrange("runs", 0, -1)]
    assert runs.count("twin-1") == 1


def test_a_copy_published_twice_runs_once(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Two messages of one copy of deferred work (same token, same retry count: a broker that
    failed mid-publish, and kombu published it again): the first runs, the second is dropped.
    Of a copy admitted by a worker that died before running it, a message the broker flags as
    redelivered runs (Celery's at-least-once), and so does a Celery retry of the copy."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "10/s", "burst": 10}})
    ext = throttle.Throttle(app)

    @app.task(bind=True, name=f"{app.main}.step", throttle="req")
    def step(self: Any, *, api_key: str) -> None:
        db.rpush("runs", f"{self.request.id}:{self.request.retries}")

    def send(work: str, retries: int = 0, **headers: Any) -> None:
        step.apply_async(
            kwargs={"api_key": "k"},
            task_id=work,
            retries=retries,
            headers={H.TOKEN: NEWER, **headers},
        )

    worker(app, pool="solo", concurrency=1)  # decides and runs messages in arrival order
    limits = [ext.settings.policy("req").limit]
    identity = {"api_key": "k", "tier": "default"}
    store = ext.store()
    store.set_guard(limits, identity, throttle.store.Guard("twin-2", NEWER), ttl=60)
    send("twin-2")
    send("twin-2")
    for work in ("twin-3", "twin-4"):  # admitted, by a worker that died then
        assert store.admit(limits, identity, guard=throttle.store.Guard(work, NEWER)).allowed
    send("twin-3")
    send("twin-3", redelivered=True)
    send("twin-4", retries=1)
    # Decided after all of the above: once it has run, so has every one of them that runs.
    assert step.apply_async(kwargs={"api_key": "k"}, task_id="last").get(timeout=TIMEOUT) is None
    runs = [x.decode() for x in db.lrange("runs", 0, -1)]
    assert runs == ["twin-2:0", "twin-3:0", "twin-4:1", "last:0"]


def test_usage_settles_the_estimate(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A task admitted at an estimated token cost that reports its real usage leaves the
    bucket charged the real usage, success or failure."""
    app = make_app(
        redis_server,
        throttle_limits={"tokens": {"rate": "60000/m", "burst": 10000, "unit": "tokens"}},
    )
    ext = throttle.Throttle(app)

    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return int(kwargs["max_tokens"])

    @app.task(name=f"{app.main}.call", throttle="tokens", throttle_cost={"tokens": estimate})
    def call(*, api_key: str, max_tokens: int, used: int, fail: bool = False) -> None:
        throttle.report_usage({"tokens": used // 2})
        throttle.report_usage({"tokens": used - used // 2})  # reports add up
        if fail:
            raise RuntimeError("the model call failed after using tokens")

    # Settlement runs in task_postrun, after the result is stored: wait for it, not for the
    # result (this receiver is connected after Throttle's, so it runs after the settlement).
    settled = threading.Semaphore(0)

    def after_settlement(**_: Any) -> None:
        settled.release()

    task_postrun.connect(after_settlement, weak=False)
    try:
        worker(app)
        call.delay(api_key="k", max_tokens=4000, used=1000).get(timeout=TIMEOUT)
        with pytest.raises(RuntimeError):
            call.delay(api_key="k", max_tokens=4000, used=500, fail=True).get(timeout=TIMEOUT)
        assert settled.acquire(timeout=TIMEOUT)
        assert settled.acquire(timeout=TIMEOUT)
    finally:
        task_postrun.disconnect(after_settlement)
    limit = ext.settings.policy("tokens").limit
    store = ext.store()
    left = store.admit([limit], {"api_key": "k", "tier": "default"}, cost=0).limits[0].remaining
    # 1,500 used of 10,000, plus what refilled at 1,000/s since: between 8,500 and the burst.
    assert 8_500 <= left <= 10_000


def test_identity_header_is_sealed_and_forgeries_are_ignored(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    record: Callable[[Any], list[dict[str, Any]]],
) -> None:
    """A raw identity header leaves the publisher as signed fingerprints; a header copied to
    another task id is ignored and that task is charged under its own arguments."""
    from celery.signals import before_task_publish

    app = make_app(redis_server, throttle_limits={"req": {"rate": "1/h", "burst": 1}})
    ext = throttle.Throttle(app)
    published = record(before_task_publish)

    @app.task(name=f"{app.main}.step", throttle="req")
    def step(**kwargs: Any) -> str:
        return "ran"

    worker(app)
    ok = step.apply_async(headers={H.IDENTITY: {"api_key": "sk-RAW-SECRET"}})
    assert ok.get(timeout=TIMEOUT) == "ran"
    sent = next(kw["headers"] for kw in published if kw["headers"].get("id") == ok.id)
    assert "sk-RAW-SECRET" not in repr(sent)
    sealed = sent[H.IDENTITY]
    # The same tenant's bucket is now empty: a second task under it is deferred, not run.
    forged_copy = step.apply_async(kwargs={"api_key": "another"}, headers={H.IDENTITY: sealed})
    assert forged_copy.get(timeout=TIMEOUT) == "ran"  # charged to "another", which had room
    fp = ext.keyspace.fingerprint("api_key", "sk-RAW-SECRET")
    assert any(fp in k.decode() for k in db.keys("*"))
    assert not any(b"sk-RAW" in k for k in db.keys("*"))


def test_argument_reprs_show_fingerprints_not_keys(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    record: Callable[[Any], list[dict[str, Any]]],
) -> None:
    """The argsrepr/kwargsrepr headers (what events and Flower show) carry fingerprints where
    the arguments hold the API key or agent id, positional or keyword; the task still gets the
    real values; reprs the caller chose are kept."""
    from celery.signals import before_task_publish

    app = make_app(redis_server, throttle_limits={"req": {"rate": "100/s"}})
    ext = throttle.Throttle(app)
    published = record(before_task_publish)

    @app.task(
        name=f"{app.main}.step",
        throttle="req",
        throttle_identity={"api_key": lambda args, kwargs: args[0], "agent_id": "agent_id"},
    )
    def step(key: str, note: str, *, agent_id: str) -> str:
        return f"{key}/{agent_id}/{note}"

    worker(app)
    result = step.delay("sk-RAW-SECRET", "sk-RAW-SECRET?", agent_id="agent-RAW")
    assert result.get(timeout=TIMEOUT) == "sk-RAW-SECRET/agent-RAW/sk-RAW-SECRET?"
    sent = next(kw["headers"] for kw in published if kw["headers"].get("id") == result.id)
    key_fp = ext.keyspace.fingerprint("api_key", "sk-RAW-SECRET")
    agent_fp = ext.keyspace.fingerprint("agent_id", "agent-RAW")
    assert sent["argsrepr"] == f"['<api_key {key_fp}>', 'sk-RAW-SECRET?']"
    assert sent["kwargsrepr"] == f"{{'agent_id': '<agent_id {agent_fp}>'}}"
    chosen = step.apply_async(("sk-RAW-SECRET", "x"), {"agent_id": "a"}, kwargsrepr="{...}")
    chosen.get(timeout=TIMEOUT)
    sent = next(kw["headers"] for kw in published if kw["headers"].get("id") == chosen.id)
    assert sent["kwargsrepr"] == "{...}"
    assert "sk-RAW-SECRET" not in sent["argsrepr"]
    # Sent by name (no task class at hand): the headers are masked before they leave.
    by_name = app.send_task(step.name, ("sk-RAW-SECRET", "y"), {"agent_id": "agent-RAW"})
    assert by_name.get(timeout=TIMEOUT) == "sk-RAW-SECRET/agent-RAW/y"
    sent = next(kw["headers"] for kw in published if kw["headers"].get("id") == by_name.id)
    assert "RAW" not in sent["argsrepr"] + sent["kwargsrepr"]


def test_the_task_sent_event_shows_fingerprints(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Celery builds its task-sent event from the argument reprs before any signal runs: the
    API key and agent id are fingerprints there too, also from a raw identity header."""
    app = make_app(
        redis_server, throttle_limits={"req": {"rate": "100/s"}}, task_send_sent_event=True
    )
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle="req")
    def step(note: str, *, api_key: str = "", agent_id: str = "") -> str:
        return note

    with events_of(app, "task-sent", 4) as events:
        worker(app)
        step.delay("a", api_key="sk-RAW-SECRET", agent_id="agent-RAW").get(timeout=TIMEOUT)
        header = {H.IDENTITY: {"api_key": "sk-RAW-OTHER"}}
        step.apply_async(("sk-RAW-OTHER",), headers=header).get(timeout=TIMEOUT)
        # By name, with a long prompt that Celery's repr cuts short, and Celery's positional
        # task id: masked all the same.
        long = "x" * 2000
        app.send_task(step.name, (long,), {"api_key": "sk-RAW-THIRD"}).get(timeout=TIMEOUT)
        step.apply_async(("b",), {"api_key": "sk-RAW-SECRET"}, "my-task-id").get(timeout=TIMEOUT)
    assert "RAW" not in repr(events)
    assert ext.keyspace.fingerprint("api_key", "sk-RAW-SECRET") in events[0]["kwargs"]
    assert ext.keyspace.fingerprint("api_key", "sk-RAW-OTHER") in events[1]["args"]
    assert ext.keyspace.fingerprint("api_key", "sk-RAW-THIRD") in events[2]["kwargs"]
    assert events[3]["uuid"] == "my-task-id"


def test_each_app_seals_its_own_identity_headers(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Two throttled apps in one process, with different secrets: a raw identity header is
    sealed by the app that publishes it, so its own worker opens it and charges that tenant."""
    other = make_app(redis_server, throttle_key_secret="another-secret-of-enough-bytes")
    throttle.Throttle(other)
    app = make_app(redis_server, throttle_limits={"req": {"rate": "1/h", "burst": 5}})
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle="req")
    def step(**kwargs: Any) -> str:
        return "ran"

    worker(app)
    header = {H.IDENTITY: {"api_key": "sk-RAW-TENANT"}}
    assert step.apply_async(headers=header).get(timeout=TIMEOUT) == "ran"
    assert step.apply_async(headers=header, task_id="fixed-id").get(timeout=TIMEOUT) == "ran"
    fp = ext.keyspace.fingerprint("api_key", "sk-RAW-TENANT")
    decision = ext.store().peek([ext.settings.policy("req").limit], {"api_key": "sk-RAW-TENANT"})
    assert decision.limits[0].remaining == pytest.approx(3, abs=0.01)  # both charged to it
    assert any(fp in k.decode() for k in db.keys("*"))


def test_max_deferrals_fails_the_task_clearly(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """With throttle_max_deferrals=2, a task that would wait longer fails with
    ThrottleExhausted naming the limit, and is not run."""
    app = make_app(
        redis_server,
        throttle_limits={"slow": {"rate": "1/h", "burst": 1}},
        throttle_max_deferrals=2,
        throttle_max_defer=0.1,
    )
    throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle="slow")
    def step(*, api_key: str) -> str:
        db.rpush("runs", "x")
        return "ran"

    worker(app)
    assert step.delay(api_key="k").get(timeout=TIMEOUT) == "ran"
    with pytest.raises(throttle.ThrottleExhausted, match="slow") as info:
        step.delay(api_key="k").get(timeout=TIMEOUT)
    assert "2 times" in str(info.value)
    assert db.llen("runs") == 1


def test_unthrottled_tasks_are_untouched(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """A task without the option runs with its headers unchanged and costs no Redis key."""
    app = make_app(redis_server, throttle_limits={"req": {"rate": "1/h", "burst": 1}})
    throttle.Throttle(app)

    @app.task(bind=True, name=f"{app.main}.plain")
    def plain(self: Any) -> bool:
        return getattr(self.request, H.ADMITTED, None) is None

    worker(app)
    assert all(plain.delay().get(timeout=TIMEOUT) for _ in range(5))
    # Only the worker's own keys: its presence and its load sample.
    assert {k for k in db.keys("throttle:*") if not k.startswith(b"throttle:{~")} == set()


def test_shadow_limits_never_deny(
    redis_server: RedisServer,
    db: redis.Redis,
    worker: Callable[[Celery], Any],
    record: Callable[[Any], list[dict[str, Any]]],
) -> None:
    """A shadow limit that would deny lets every task run and reports what it would have done."""
    app = make_app(
        redis_server,
        throttle_limits={
            "real": {"rate": "100/s", "burst": 100},
            "trial": {"rate": "1/h", "burst": 2, "mode": "shadow"},
        },
    )
    throttle.Throttle(app)
    would = record(signals.shadow_denied)
    deferred = record(signals.task_throttled)

    @app.task(name=f"{app.main}.step", throttle=["real", "trial"])
    def step(*, api_key: str) -> str:
        return "ran"

    worker(app)
    assert [step.delay(api_key="k").get(timeout=TIMEOUT) for _ in range(5)] == ["ran"] * 5
    assert len(would) == 3
    assert {kw["limit"] for kw in would} == {"trial"}
    assert deferred == []


def test_eager_mode_waits_for_the_slot(redis_server: RedisServer, db: redis.Redis) -> None:
    """In eager mode (no worker) a denied call waits exactly until its booked slot, then runs:
    with an injected clock and sleep, the waits are the slots."""
    clock = ManualClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    app = make_app(
        redis_server,
        task_always_eager=True,
        throttle_limits={"req": {"rate": "4/s", "burst": 2}},
        throttle_max_defer=10,
    )
    from throttle import Keyspace, MemoryStore

    store = MemoryStore(Keyspace(SECRET), clock=clock)
    throttle.Throttle(app, store=store, clock=clock, sleep=sleep)

    @app.task(name=f"{app.main}.step", throttle="req")
    def step(i: int, *, api_key: str) -> int:
        return i

    assert [step.delay(i, api_key="k").get() for i in range(5)] == list(range(5))
    assert slept == pytest.approx([0.25, 0.25, 0.25])


def test_each_deferral_sends_a_task_throttled_event(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """With task events on, each deferral sends task-throttled with the task id, the limit that
    bound, the API key's fingerprint (never the key), retry_after and the deferral count."""
    app = make_app(
        redis_server,
        throttle_limits={"req": {"rate": "10/s", "burst": 1}},
        worker_send_task_events=True,
    )
    ext = throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle="req")
    def step(*, api_key: str) -> None:
        return None

    with events_of(app, "task-throttled", 2) as events:
        worker(app)
        results = [step.delay(api_key="sk-secret-key") for _ in range(3)]
        for r in results:
            r.get(timeout=TIMEOUT)
    assert len(events) >= 2
    fp = ext.keyspace.fingerprint("api_key", "sk-secret-key")
    ids = {r.id for r in results}
    for event in events:
        assert event["uuid"] in ids
        assert event["limit"] == "req"
        assert event["key"] == fp
        assert event["retry_after"] > 0
        assert event["deferrals"] >= 1
        assert "sk-secret-key" not in repr(event)


def test_the_gate_on_redis_cluster(
    redis_server: RedisServer,
    redis_cluster: Any,
    cluster_client: Any,
    worker: Callable[[Celery], Any],
) -> None:
    """With throttle_redis_cluster, the store is a cluster: a per-key and a global limit (in
    another slot) both hold, with no CROSSSLOT error."""
    app = make_app(
        redis_server,
        throttle_redis_url=redis_cluster.url,
        throttle_redis_cluster=True,
        throttle_limits={
            "key": {"rate": "100/s", "burst": 100},
            "all": {"rate": "10/s", "burst": 2, "per": []},
        },
    )
    deferred: list[str] = []
    throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle=["key", "all"])
    def step(i: int, *, api_key: str) -> int:
        return i

    def note(limit: str = "", **_: Any) -> None:
        deferred.append(limit)

    signals.task_throttled.connect(note, weak=False)
    try:
        worker(app)
        results = [step.delay(i, api_key=f"k{i % 3}") for i in range(8)]
        assert [r.get(timeout=TIMEOUT) for r in results] == list(range(8))
    finally:
        signals.task_throttled.disconnect(note)
    assert deferred
    assert set(deferred) == {"all"}


def test_work_without_identity_shares_the_anonymous_bucket(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """Tasks that carry no API key are throttled together under the anonymous bucket of an
    inline rate, never left unthrottled; a keyed caller has its own bucket."""
    app = make_app(redis_server)
    throttle.Throttle(app)

    @app.task(name=f"{app.main}.step", throttle="1/h")
    def step(**kwargs: Any) -> str:
        return "ran"

    deferred: list[str] = []
    seen = threading.Event()

    def note(task_id: str = "", **_: Any) -> None:
        deferred.append(task_id)
        seen.set()

    signals.task_throttled.connect(note, weak=False)
    try:
        worker(app)
        assert step.delay().get(timeout=TIMEOUT) == "ran"  # the anonymous bucket's one unit
        assert step.delay(api_key="k").get(timeout=TIMEOUT) == "ran"  # a tenant of its own
        second_id = step.apply_async(ignore_result=True).id
        assert seen.wait(TIMEOUT)  # deferred to the next anonymous slot, an hour away
    finally:
        signals.task_throttled.disconnect(note)
    assert deferred == [second_id]


def test_pool_side_fallback_where_no_gate_runs(
    redis_server: RedisServer, db: redis.Redis, worker: Callable[[Celery], Any]
) -> None:
    """On a worker without the gate step, the task's own before_start admits it: work over the
    limit is deferred from the pool (re-published, not run, not failed) and runs once later."""
    from throttle.celeryext.worker import GateStep

    app = make_app(redis_server, throttle_limits={"req": {"rate": "10/s", "burst": 2}})
    throttle.Throttle(app)
    app.steps["consumer"].discard(GateStep)
    deferred: list[str] = []

    def note(task_id: str = "", **_: Any) -> None:
        deferred.append(task_id)

    @app.task(bind=True, name=f"{app.main}.step", throttle="req")
    def step(self: Any, i: int, *, api_key: str) -> int:
        db.rpush("runs", self.request.id)
        return i

    signals.task_throttled.connect(note, weak=False)
    try:
        worker(app)
        results = [step.delay(i, api_key="k") for i in range(6)]
        assert [r.get(timeout=TIMEOUT) for r in results] == list(range(6))
    finally:
        signals.task_throttled.disconnect(note)
    runs = [x.decode() for x in db.lrange("runs", 0, -1)]
    assert sorted(runs) == sorted(r.id for r in results)
    assert len(deferred) >= 4  # at least four of six waited for a slot
