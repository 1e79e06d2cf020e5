# SPDX-License-Identifier: MIT
"""What only the Redis store does: script reloading, outages, timeouts, and admissions that span
Redis Cluster slots."""

from __future__ import annotations

import os
import select
import signal
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from redis.exceptions import NoScriptError

import throttle.store.redis
from tests.conftest import SECRET, T0
from tests.redis_servers import RedisServer
from throttle import (
    Keyspace,
    Limit,
    MemoryStore,
    Outcome,
    RedisStore,
    StoreError,
    StoreUnavailable,
)
from throttle.identity import Fingerprint, total_key
from throttle.store.base import Guard, Prepared

KEY = {"api_key": "tenant"}


def test_script_flush_is_recovered(redis_client: redis.Redis, keyspace: Keyspace) -> None:
    """After SCRIPT FLUSH the next admission and settlement reload their scripts and succeed."""
    store = RedisStore(redis_client, keyspace)
    tokens = Limit("tokens", "1000/m", burst=1000)
    first = store.admit([tokens], KEY, cost=100, now_us=T0)
    redis_client.script_flush()
    assert redis_client.script_exists(store._admit_script.sha) == [False]
    second = store.admit([tokens], KEY, cost=100, now_us=T0)
    assert second.limits[0].remaining == 800
    redis_client.script_flush()
    assert first.receipt is not None
    store.settle(first.receipt, {"tokens": 0}, now_us=T0)
    assert store.admit([tokens], KEY, cost=0, now_us=T0).limits[0].remaining == 900


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A private server this test may kill and restart."""
    with RedisServer() as server:
        yield server


def test_outage_raises_store_unavailable_then_recovers(own_server: RedisServer) -> None:
    """A dead server gives StoreUnavailable (not a hang); once it is back, admissions resume."""
    store = RedisStore(own_server.client(socket_timeout=1), Keyspace(SECRET))
    limit = Limit("req", "10/s")
    assert store.admit([limit], KEY).allowed
    own_server.kill()
    with pytest.raises(StoreUnavailable):
        store.admit([limit], KEY)
    own_server.restart()
    assert store.admit([limit], KEY).allowed


def test_a_stalled_server_times_out(own_server: RedisServer) -> None:
    """With a short socket timeout, a paused server raises StoreUnavailable within it."""
    store = RedisStore(own_server.client(socket_timeout=0.05), Keyspace(SECRET))
    limit = Limit("req", "10/s")
    assert store.admit([limit], KEY).allowed
    own_server.client().client_pause(2000)
    with pytest.raises(StoreUnavailable, match="Timeout"):
        store.admit([limit], KEY)
    own_server.client().client_unpause()
    assert store.admit([limit], KEY).allowed


def test_errors_do_not_show_credentials(own_server: RedisServer) -> None:
    """A password in the URL does not reach the StoreUnavailable message."""
    url = f"redis://user:hunter2-secret@127.0.0.1:{own_server.port}/0"
    store = RedisStore(redis.Redis.from_url(url, socket_timeout=1), Keyspace(SECRET))
    own_server.kill()
    with pytest.raises(StoreUnavailable) as info:
        store.admit([Limit("req", "1/s")], KEY)
    assert "hunter2" not in str(info.value)


def test_cluster_admission_spanning_two_slots(cluster_client: redis.cluster.RedisCluster) -> None:
    """A tenant limit and a global limit live in different slots: the admission runs once per
    slot, without CROSSSLOT, and a denial in the second slot refunds the first."""
    keyspace = Keyspace(SECRET)
    store = RedisStore(cluster_client, keyspace)
    tenant = Limit("tenant", "10/s", burst=10)
    glob = Limit("global", "1/s", burst=2, per=[])
    slots = {key_slot(keyspace.bucket(lim, KEY).tag.encode()) for lim in (tenant, glob)}
    assert len(slots) == 2
    assert store.admit([tenant, glob], KEY, now_us=T0).allowed
    assert store.admit([tenant, glob], KEY, now_us=T0).allowed
    denied = store.admit([tenant, glob], KEY, now_us=T0)
    assert denied.outcome is Outcome.DENIED
    assert denied.bound_by == "global"
    states = {s.name: s for s in denied.limits}
    assert states["tenant"].remaining == 8  # the first slot's charge was refunded


def test_cluster_booking_in_the_global_slot(cluster_client: redis.cluster.RedisCluster) -> None:
    """A booking made in the second slot is redeemed there, and the first slot is charged only
    once, when the work comes back."""
    store = RedisStore(cluster_client, Keyspace(SECRET))
    tenant = Limit("tenant", "10/s", burst=10)
    glob = Limit("global", "1/s", burst=1, per=[])
    assert store.admit([tenant, glob], KEY, now_us=T0).allowed
    booked = store.admit([tenant, glob], KEY, reserve=True, now_us=T0)
    assert booked.outcome is Outcome.BOOKED
    assert booked.bound_by == "global"
    assert {s.name: s.remaining for s in booked.limits}["tenant"] == 9
    back = store.admit([tenant, glob], KEY, booking=booked.booking, now_us=T0 + 1_000_000)
    assert back.outcome is Outcome.REDEEMED
    assert {s.name: s.remaining for s in back.limits}["tenant"] == pytest.approx(9)
    replay = store.admit([tenant, glob], KEY, booking=booked.booking, now_us=T0 + 1_000_000)
    assert replay.outcome is Outcome.DENIED  # the booking was deleted in every slot
    assert not cluster_client.keys("*~b:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES)


def test_cluster_booking_kept_while_a_later_slot_denies(
    cluster_client: redis.cluster.RedisCluster,
) -> None:
    """A booking redeemed in the first slot is kept there while a later slot denies: the work,
    deferred again, still holds its slot when it comes back, and only then is it deleted."""
    store = RedisStore(cluster_client, Keyspace(SECRET))
    tenant = Limit("tenant", "1/s", burst=1)
    glob = Limit("global", "2/m", burst=2, per=[])
    assert store.admit([tenant, glob], KEY, now_us=T0).allowed
    booked = store.admit([tenant, glob], KEY, reserve=True, now_us=T0)
    assert booked.outcome is Outcome.BOOKED
    assert booked.bound_by == "tenant"
    # Another tenant takes the global limit's last unit (the next in 30 s).
    assert store.admit([tenant, glob], {"api_key": "other"}, now_us=T0).allowed
    early = store.admit([tenant, glob], KEY, booking=booked.booking, now_us=T0 + 1_000_000)
    assert early.outcome is Outcome.DENIED
    assert early.bound_by == "global"
    back = store.admit([tenant, glob], KEY, booking=booked.booking, now_us=T0 + 30_000_000)
    assert back.outcome is Outcome.REDEEMED  # the tenant slot's booking was still there
    assert not cluster_client.keys("*~b:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES)


@pytest.fixture(params=["lean", "redis-py"])
def io_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the store talks to Redis: its own reply parser (with hiredis), and redis-py's
    connection methods (used without hiredis, and over TLS)."""
    if request.param == "redis-py":
        monkeypatch.setattr(throttle.store.redis, "_hiredis", None)
    return str(request.param)


def _replies(link: Any, count: int) -> list[Any]:
    """``count`` replies from a link, reading whenever its socket is readable."""
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        if select.select([link.fileno()], [], [], 1)[0]:
            got += link.ready()
    return got


def test_pipelined_replies_come_back_in_order(
    io_way: str, redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """Several admissions in flight on one link: the replies come back in the order sent, and
    an error reply (a script Redis does not know) stands in its place as an exception."""
    store = RedisStore(redis_client, keyspace)
    store.load_scripts()
    pipeline = store.pipeline()
    assert pipeline is not None
    link, encode = pipeline
    limit = Limit("req", "10/s", burst=3)
    prepared = [store.prepare([limit], KEY, now_us=T0) for _ in range(4)]
    frames = [encode(p) for p in prepared]
    frames[2] = frames[2].replace(store._admit_script.sha.encode(), b"0" * 40)
    for frame in frames:
        link.send(frame)
    replies = _replies(link, 4)
    assert isinstance(replies[2], NoScriptError)
    ran = [
        store.finish(p, r).outcome
        for i, (p, r) in enumerate(zip(prepared, replies, strict=True))
        if i != 2
    ]
    # The third never ran, so the fourth found room: three admissions fill the burst of 3.
    assert ran == [Outcome.ADMITTED] * 3
    assert store.admit([limit], KEY, now_us=T0).outcome is Outcome.DENIED
    link.close()


def test_a_killed_connection_is_reported_and_replaced(
    io_way: str, redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """CLIENT KILL of the store's connection: the pipelined link reports it as a connection
    error; the direct path's next admission after the error connects again."""
    store = RedisStore(redis_client, keyspace)
    limit = Limit("req", "100/s")
    assert store.admit([limit], KEY).allowed
    pipeline = store.pipeline()
    assert pipeline is not None
    link, encode = pipeline
    link.send(encode(store.prepare([limit], KEY)))
    assert len(_replies(link, 1)) == 1
    redis_client.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(redis.ConnectionError):
        _replies(link, 1)
    with pytest.raises(StoreUnavailable):
        store.admit([limit], KEY)
    assert store.admit([limit], KEY).allowed


class _Interrupted(Exception):
    """Stands for a task's soft time limit arriving while an admission waits for Redis."""


def test_an_interrupted_call_does_not_leave_its_reply_to_the_next(
    io_way: str, own_server: RedisServer
) -> None:
    """An exception (a soft time limit, a KeyboardInterrupt) raised while a call waits for its
    reply closes the connection: the next call reads its own reply, not the abandoned one."""
    store = RedisStore(own_server.client(), Keyspace(SECRET))
    small, large = Limit("small", "1/h", burst=10), Limit("large", "1/h", burst=100)
    store.load_scripts()
    assert store.admit([large], KEY).limits[0].remaining == pytest.approx(99, abs=0.5)

    def interrupt(*_: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    own_server.client().client_pause(1000)  # the next call waits for its reply
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_Interrupted):
            store.admit([small], KEY)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        own_server.client().client_unpause()
    assert store.admit([large], KEY).limits[0].remaining == pytest.approx(98, abs=0.5)


def test_a_resp3_client_is_served_the_redis_py_way(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """A client speaking RESP3 (protocol=3) may get push messages between replies: its
    admissions, direct and pipelined, go through redis-py's own reading, and work."""
    client = redis.Redis.from_url(redis_server.url, protocol=3)
    store = RedisStore(client, Keyspace(SECRET))
    limit = Limit("req", "10/s", burst=10)
    assert store.admit([limit], KEY, now_us=T0).limits[0].remaining == 9
    pipeline = store.pipeline()
    assert pipeline is not None
    link, encode = pipeline
    prepared = store.prepare([limit], KEY, now_us=T0)
    link.send(encode(prepared))
    (reply,) = _replies(link, 1)
    assert store.finish(prepared, reply).limits[0].remaining == 8  # type: ignore[arg-type]
    assert link._reader is None  # not the lean reader
    link.close()


def test_non_ascii_task_ids_go_over_the_fast_path(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """A deferral guard names the task id, which Celery lets be any text: the hand-packed
    command counts its bytes, not its characters, and the key reads back as written."""
    store = RedisStore(redis_client, keyspace)
    limit = Limit("req", "1/h", burst=1)
    work = "tâche-😀-\u2028"
    guard = Guard(work, None, "next-token", ttl=60)
    assert store.admit([limit], KEY, guard=guard, now_us=T0).allowed
    denied = store.admit([limit], KEY, guard=guard, now_us=T0)
    assert denied.outcome is Outcome.DENIED
    tag = store.charges([limit], KEY)[0].bucket.tag
    assert redis_client.get(keyspace.guard_key(tag, work)) == b"->next-token"


def _templates(store: RedisStore, remembered: bool) -> dict[Any, Any]:
    """The packed admissions a store keeps: per plan, or per shape for plans not remembered."""
    if not remembered:
        return store._parts
    return {(id(plan), how): t for plan in store._plans.values() for how, t in plan.sent.items()}


@pytest.fixture(params=[True, False], ids=["remembered", "not-remembered"])
def remembered(request: pytest.FixtureRequest) -> bool:
    """Whether the store remembers plans: as for identities that recur, or not, as it does for
    a while once too few recur (many thousands of tenants)."""
    return bool(request.param)


def _store(redis_client: redis.Redis, keyspace: Keyspace, remembered: bool) -> RedisStore:
    store = RedisStore(redis_client, keyspace)
    if not remembered:
        store._plan_pause = 1 << 30
    return store


def test_bookings_repacked_from_a_template_are_each_their_own(
    redis_client: redis.Redis, keyspace: Keyspace, remembered: bool
) -> None:
    """An admission that books when denied (``reserve=True``, nothing to redeem) is packed
    from its plan's template too (or its shape's, for a plan not remembered), with a new
    booking id, and its booking key, each time: each booking is its own, in its own key, in
    slot order, and redeems once at its slot; with a horizon, the template of that horizon
    books nothing beyond it."""
    store = _store(redis_client, keyspace, remembered)
    key = Limit("key", "1/h", burst=1)
    agent = Limit("agent", "10/h", burst=10, per=("api_key", "agent_id"))
    who = {**KEY, "agent_id": "a"}
    first = store.admit([key, agent], who, reserve=True)
    assert first.outcome is Outcome.ADMITTED
    booked = [store.admit([key, agent], who, reserve=True) for _ in range(3)]
    assert len(_templates(store, remembered)) == 1
    assert [d.outcome for d in booked] == [Outcome.BOOKED] * 3
    ids = [d.booking for d in booked]
    assert len(set(ids)) == 3
    assert None not in ids
    waits = [d.retry_after for d in booked]
    assert waits == sorted(waits)
    assert [round(w / 3600) for w in waits] == [1, 2, 3]
    tag = store.charges([key, agent], who)[0].bucket.tag
    for booking in ids:
        assert booking is not None
        assert redis_client.exists(keyspace.booking_key(tag, booking))
    # Each booking redeems once, at its slot (the script's clock moved there by the test's).
    seconds, micros = redis_client.time()
    now = seconds * 1_000_000 + micros
    slot = now + round(waits[0] * 1_000_000) + 1
    redeemed = store.admit([key, agent], who, booking=ids[0], now_us=slot)
    assert redeemed.outcome is Outcome.REDEEMED
    again = store.admit([key, agent], who, booking=ids[0], now_us=slot)
    assert again.outcome is not Outcome.REDEEMED
    assert not redis_client.exists(keyspace.booking_key(tag, ids[0]))
    # A horizon has a template of its own: the next slot is hours away, so nothing is booked.
    for _ in range(2):
        beyond = store.admit([key, agent], who, reserve=True, horizon=60)
        assert beyond.outcome is Outcome.HORIZON
        assert beyond.retry_after == 60
    assert len(_templates(store, remembered)) == 2
    assert len(redis_client.keys(keyspace.booking_key(tag, "*"))) == 2  # ids[1] and ids[2]


def test_plain_admissions_repacked_from_a_template_are_each_their_own(
    redis_client: redis.Redis, keyspace: Keyspace, remembered: bool
) -> None:
    """A plain admission (no booking, guard or test clock) is packed from its plan's template
    (or its shape's) with a fresh nonce each time: a sliding window counts every one of
    them, the receipts settle their own admissions, and peeks from a template charge
    nothing."""
    store = _store(redis_client, keyspace, remembered)
    window = Limit("window", "5/h", algorithm="sliding_window")
    tokens = Limit("tokens", "1000/h", burst=1000)
    decisions = [store.admit([window, tokens], KEY, cost={"tokens": 100}) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert len(_templates(store, remembered)) == 1
    nonces = {d.receipt.nonce for d in decisions if d.receipt is not None}
    assert len(nonces) == 5
    first = decisions[0].receipt
    assert first is not None
    store.settle(first, {"tokens": 0})  # gives back the first admission's 100 tokens only
    for _ in range(3):
        peeked = store.peek([window, tokens], KEY, cost={"tokens": 100})
        assert peeked.limits[1].remaining == pytest.approx(600, abs=1)
        assert not peeked.allowed  # the window is full


def test_a_forked_child_opens_a_connection_of_its_own(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """A store used before a fork (a prefork worker's parent) is used by both processes
    after it: each on a connection of its own, never one socket whose replies they would
    take from each other."""
    store = RedisStore(redis_client, keyspace)
    limit = Limit("requests", "100000/s")

    def port() -> int:
        return int(store._fast.link().conn._sock.getsockname()[1])  # type: ignore[union-attr]

    assert store.admit([limit], {"api_key": "k"}).allowed
    parent = port()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports whether every admission was decided, and its port
        try:
            ok = all(store.admit([limit], {"api_key": "k"}).allowed for _ in range(200))
            os.write(write, f"{int(ok)} {port()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    assert all(store.admit([limit], {"api_key": "k"}).allowed for _ in range(200))
    with os.fdopen(read) as answer:
        ok, child = answer.read().split()
    assert os.waitpid(pid, 0)[1] == 0
    assert ok == "1"
    assert int(child) != parent
    assert port() == parent  # the parent keeps its own


def test_a_forked_child_makes_nonces_of_its_own(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """Nonces name sliding-window log members and receipts: a child forked from a process
    that used a store must not repeat the nonces its parent goes on to make."""
    store = RedisStore(redis_client, keyspace)
    before = [store._nonces.next() for _ in range(100)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports its next nonces
        try:
            os.write(write, " ".join(store._nonces.next() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    parent = [store._nonces.next() for _ in range(100)]
    with os.fdopen(read) as answer:
        child = answer.read().split()
    assert os.waitpid(pid, 0)[1] == 0
    assert len(child) == 100
    assert len(set(before + parent + child)) == 300


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_short_reply_has_two_numbers_per_limit_and_the_time(
    redis_client: redis.Redis, keyspace: Keyspace, count: int
) -> None:
    """An admission that redeemed nothing answers {'admitted', remaining and us until full per
    limit, now}: no more, no less, with one limit, with two (what the script's tables are
    sized for) and with three."""
    store = RedisStore(redis_client, keyspace)
    rates = [10, 20, 50][:count]  # whole emission intervals: exact arithmetic
    limits = [Limit(f"l{i}", f"{rate}/s") for i, rate in enumerate(rates)]
    prepared = store.prepare(limits, KEY, cost=2, now_us=T0 + 500_000)
    assert isinstance(prepared, Prepared)
    reply = store._run_prepared(prepared)
    assert reply[0] == b"admitted"
    assert len(reply) == 2 + 2 * count
    for i, rate in enumerate(rates):
        # A bucket of `rate` units, 2 taken: rate - 2 units left (in millionths), full again
        # after 2 emission intervals of 1/rate s.
        assert reply[1 + 2 * i] == (rate - 2) * 1_000_000
        assert reply[2 + 2 * i] == 2 * 1_000_000 // rate
    assert reply[-1] == T0 + 500_000


# -- plans filled in from their shape's key template ------------------------------------------

_MODEL = ("model",)
_POOL = (
    Limit("req", "10/s"),
    Limit("agent", "5/s", per=("api_key", "agent_id")),
    Limit("tiered", "7/m", per=("api_key", "tier")),
    Limit("global", "100/s", per=()),
    Limit("per-model", "9/m", per=("model",), dimensions=_MODEL),
    Limit("three", "9/m", per=("agent_id", "model", "api_key"), dimensions=_MODEL),
    Limit("window", "20/m", per=("api_key", "agent_id"), algorithm="sliding_window"),
)
_VALUES = st.one_of(
    st.none(),
    # Any code point, surrogates too; past 256 characters a value is fingerprinted anew.
    st.text(st.characters(blacklist_categories=()), max_size=300),
    st.sampled_from(["t", "{x}", "%s", "a:b", "\x00", "\x01" * 14, ""]),
    st.integers(-5, 5),
    st.builds(lambda v: Fingerprint(v), st.from_regex(r"\A[A-Za-z0-9_-]{16}\Z")),
)
_IDENTITIES = st.dictionaries(st.sampled_from(["api_key", "agent_id", "tier", "model"]), _VALUES)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chosen=st.lists(st.sampled_from(_POOL), min_size=1, max_size=4, unique=True),
    first=_IDENTITIES,
    values=_IDENTITIES,
    proxy=st.booleans(),
    cost=st.sampled_from([1, 2.5, "dict"]),
    prefix=st.sampled_from(["throttle", "a.b:c-d_e"]),
)
def test_plans_filled_from_a_key_template_are_laid_out_as_each_key_is(
    redis_client: redis.Redis,
    chosen: list[Limit],
    first: dict[str, object],
    values: dict[str, object],
    proxy: bool,
    cost: object,
    prefix: str,
) -> None:
    """A plan not remembered is filled in from its shape's template of keys and their packing
    (made for another identity: ``first``), when every value its keys need is a string
    fingerprinted from the cache: its buckets, keys and packed keys are those that laying
    out each limit's key and packing them give. Other identities (None, a long string, an
    integer, a Fingerprint) and sliding windows take the general path, to the same end."""
    store = RedisStore(redis_client, Keyspace(SECRET, prefix=prefix))
    store._plan_pause = 1 << 30
    costs = {chosen[0].name: 2} if cost == "dict" else cost
    who = types.MappingProxyType(values) if proxy else values
    store._plan(chosen, first, costs)  # type: ignore[arg-type]
    plan = store._plan(chosen, who, costs)  # type: ignore[arg-type]
    expected = store.charges(chosen, who, costs)  # type: ignore[arg-type]
    assert plan.charges == expected
    keys = []
    for c in expected:
        keys.append(c.bucket.key)
        if c.limit.algorithm == "sliding_window":
            keys.append(total_key(c.bucket))
    assert plan.keys == tuple(keys)
    shape = store._shape(chosen, who, costs)  # type: ignore[arg-type]
    assert plan.wire == store._encode_keys(keys, shape.wire)
    # The template is there to be used: for every shape without a window.
    windows = any(lim.algorithm == "sliding_window" for lim in chosen)
    assert (shape.keys is None) == windows


def _spelt(prepared: Prepared) -> tuple[object, ...]:
    """A prepared admission with its nonce (and the booking id it names) taken out."""
    nonce = prepared.nonce
    bulk = b"$%d\r\n%s\r\n" % (len(nonce), nonce.encode())
    assert prepared.frame is not None
    assert prepared.frame.count(bulk) == 1
    frame = prepared.frame.replace(bulk, b"<nonce>").replace(nonce.encode(), b"<booking>")
    keys = [k.replace(nonce, "<booking>") for k in prepared.keys]
    argv = [*prepared.argv[:4], "<nonce>", *prepared.argv[5:]]
    return prepared.charges, keys, argv, prepared.booking is None, frame


@pytest.mark.parametrize(
    "how",
    [{}, {"reserve": True}, {"peek": True}, {"reserve": True, "horizon": 60.0}],
    ids=["plain", "reserve", "peek", "horizon"],
)
def test_an_admission_not_remembered_is_packed_as_a_remembered_one(
    redis_client: redis.Redis, keyspace: Keyspace, how: dict[str, Any]
) -> None:
    """A plain admission whose plan is not remembered is packed straight from its shape's key
    template, without a plan: into the frame, keys and arguments that a remembered plan gives
    (laid out the first time, from its own template after), but for its nonce."""
    limits = [Limit("key", "3/h", burst=3), Limit("agent", "2/h", per=("api_key", "agent_id"))]
    who = {"api_key": "tenant-{1}%s", "agent_id": "agent"}
    fresh = _store(redis_client, keyspace, remembered=False)
    kept = _store(redis_client, keyspace, remembered=True)
    plain = (bool(how.get("peek")), False, bool(how.get("reserve")), how.get("horizon"))
    assert isinstance(fresh._plan(limits, who, 1, plain), Prepared)  # no plan made
    # Its limits checked first (an admission for another identity): then plans are kept, and
    # the calls below are laid out, then packed from the template that made.
    kept.prepare(limits, {"api_key": "other"}, **how)
    made = [store.prepare(limits, who, **how) for store in (fresh, fresh, kept, kept)]
    assert all(isinstance(p, Prepared) for p in made)
    spelt = [_spelt(p) for p in made]  # type: ignore[arg-type]
    assert spelt[1:] == spelt[:1] * 3
    assert not fresh._plans
    assert len(kept._plans) == 1
    assert len(_templates(kept, remembered=True)) == 1
    assert len({p.nonce for p in made}) == 4  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "how", [{}, {"peek": True}, {"adaptive": True}], ids=["plain", "peek", "adaptive"]
)
def test_a_packed_admission_fills_in_as_prepare_packs_it(
    redis_client: redis.Redis, keyspace: Keyspace, how: dict[str, Any]
) -> None:
    """``pack()`` finds an identity's admission packed but for its nonce once ``prepare()``
    has remembered and packed it, and each ``fill()`` of it is what ``prepare()`` gives, with
    a nonce and arguments of its own, and runs as that does. None before, and where the store
    keeps no such packing: a value that is not a short string, identities whose plans are
    not remembered now, the in-process store."""
    limits = [Limit("key", "3/h", burst=3), Limit("agent", "2/h", per=("api_key", "agent_id"))]
    who = {"api_key": "tenant-{1}%s", "agent_id": "agent"}
    store = RedisStore(redis_client, keyspace)
    store.load_scripts()
    for _ in range(2):  # the limits validated, then the plan remembered and packed
        assert store.pack(limits, who, **how) is None
        store.prepare(limits, who, **how)
    packed = store.pack(limits, who, **how)
    assert packed is not None
    assert store.pack(limits, who, cost=2, **how) is None  # (another admission)
    filled = [store.fill(packed) for _ in range(3)]
    prepared = store.prepare(limits, who, **how)
    assert isinstance(prepared, Prepared)
    assert [_spelt(p) for p in filled] == [_spelt(prepared)] * 3
    assert len({p.nonce for p in [*filled, prepared]}) == 4
    assert all(p.argv[4] == p.nonce for p in filled)
    assert len({id(p.argv) for p in [*filled, packed]}) == 4
    pipeline = store.pipeline()
    assert pipeline is not None
    link, encode = pipeline
    for p in filled:
        link.send(encode(p))
    finish = store.finish_peek if how.get("peek") else store.finish
    outcomes = [finish(p, r).outcome for p, r in zip(filled, _replies(link, 3), strict=True)]
    # The agent's limit (burst 2) binds the third: a peek charges nothing, so all pass.
    assert outcomes == [Outcome.ADMITTED] * (3 if how.get("peek") else 2) + (
        [] if how.get("peek") else [Outcome.DENIED]
    )
    link.close()
    for other in ({"api_key": "x" * 257}, {"api_key": 7}):
        for _ in range(2):
            store.prepare(limits, other, **how)
        assert store.pack(limits, other, **how) is None
    fresh = _store(redis_client, keyspace, remembered=False)
    memory = MemoryStore(keyspace)
    for store in (fresh, memory):
        for _ in range(2):
            store.prepare(limits, who, **how)
        assert store.pack(limits, who, **how) is None


def test_identities_found_packed_do_not_keep_plans_remembered(
    redis_client: redis.Redis, keyspace: Keyspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for first (as the ASGI middleware does), ``pack()`` neither remembers a plan nor
    counts a use of one it does not find: identities that never come back still pause the
    remembering of plans, and identities that do are found packed, counted as plans used."""
    monkeypatch.setattr(throttle.store.base, "_PLANS", 8)
    limits = [Limit("req", "10/s")]
    store = RedisStore(redis_client, keyspace)
    store.prepare(limits, KEY)  # (its limits validated)
    for i in range(12):
        who = {"api_key": f"once-{i}"}
        assert store.pack(limits, who) is None
        store.prepare(limits, who)
    assert store._plan_pause > 0
    store._plan_pause = 0
    store._plans.clear()
    store._plan_hits = 0
    for i in range(12):  # four identities, three times each
        who = {"api_key": f"again-{i % 4}"}
        if store.pack(limits, who) is None:
            store.prepare(limits, who)
    assert store._plan_pause == 0
    assert len(store._plans) == 4
    assert store._plan_hits == 8  # each found packed after its first admission


def test_a_plan_pause_counted_below_zero_is_over(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """Threads that count the pause on remembering plans down at once can take it below 0:
    plans are remembered then, not skipped for ever."""
    store = RedisStore(redis_client, keyspace)
    store._plan_pause = -3
    limits = [Limit("req", "10/s")]
    for _ in range(2):  # (the first one validates the limits)
        store.prepare(limits, KEY)
    assert len(store._plans) == 1
    assert store._plan_pause == -3


def test_packed_admissions_are_bounded_in_all(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """A horizon computed per call packs an admission each time (never used again): the
    plans remembered hold at most as many packed admissions in all as plans are remembered
    (4,096), however many each plan has."""
    store = RedisStore(redis_client, keyspace)
    limits = [Limit("req", "10/s")]
    most = throttle.store.base._PLANS
    for horizon in range(1, 9):
        for i in range(most // 6):
            store.prepare(limits, {"api_key": f"k{i}"}, reserve=True, horizon=float(horizon))
    assert len(store._plans) == most // 6
    held = len(_templates(store, remembered=True))
    assert 0 < held <= most


def test_shapes_of_costs_that_vary_share_one_key_template(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """A cost estimated per call (LLM tokens) makes a shape per cost; the template of their
    keys is made once for the list of limits, not once per shape."""
    store = _store(redis_client, keyspace, remembered=False)
    limits = [Limit("req", "60/m"), Limit("tokens", "20000/m", unit="tokens", max_cost=4096)]
    for tokens in (1, 7, 4096):
        store.prepare(limits, KEY, cost={"tokens": tokens})
    templates = {id(shape.keys) for shape in store._shapes.values()}
    assert len(store._shapes) == 3
    assert len(templates) == 1
    assert None not in {shape.keys for shape in store._shapes.values()}


def test_an_admission_filled_from_a_key_template_charges_the_laid_out_buckets(
    redis_client: redis.Redis, keyspace: Keyspace
) -> None:
    """End to end: admissions of identities not remembered, filled in from the template,
    charge the buckets their keys name, and an identity remembered meets the same state."""
    limits = [Limit("key", "3/h", burst=3), Limit("agent", "2/h", per=("api_key", "agent_id"))]
    filled = _store(redis_client, keyspace, remembered=False)
    laid_out = _store(redis_client, keyspace, remembered=True)
    who = {"api_key": "tenant-{1}%s", "agent_id": "agent"}
    assert filled.admit(limits, who, now_us=T0).allowed
    assert filled._shape(limits, who, 1).keys is not None
    assert laid_out.admit(limits, who, now_us=T0).allowed
    denied = filled.admit(limits, who, now_us=T0)
    assert denied.bound_by == "agent"
    assert [state.remaining for state in denied.limits] == [1, 0]
    for charge in laid_out.charges(limits, who):
        assert redis_client.exists(charge.bucket.key)


@pytest.mark.parametrize(
    "reply",
    [
        [b"admitted", 5_000_000],  # the short reply, cut
        [b"admitted", b"x", 1, 2, 3, 4],  # not a number
        [b"denied", 1],  # the long reply, cut
        [b"nonsense", 1, 2, 3, 4, 5],
        [],
        [b"denied", 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no such limit binds
        [b"denied", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [b"admitted", 1, 2, 3, 4, 10**400],  # past a float
    ],
)
def test_a_reply_the_script_never_gives_is_a_store_error(
    redis_client: redis.Redis, keyspace: Keyspace, reply: list[object]
) -> None:
    """A reply that is not what admit.lua answers is refused with a StoreError naming it,
    not taken for a decision (nor left to fail with an IndexError or a TypeError)."""
    store = RedisStore(redis_client, keyspace)
    limits = [Limit("key", "3/h"), Limit("agent", "2/h", per=("api_key", "agent_id"))]
    prepared = store.prepare(limits, {"api_key": "k", "agent_id": "a"})
    assert isinstance(prepared, Prepared)
    with pytest.raises(StoreError, match="unexpected reply from the admission script"):
        store.finish(prepared, reply)
