# SPDX-License-Identifier: MIT
"""AsyncStore against a real Redis: pipelined admissions, and a script Redis lost while
admissions wait (loaded again once, or every waiting admission told why not)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import SECRET
from tests.redis_servers import RedisServer
from throttle import Keyspace, Limit, RedisStore, StoreError, StoreUnavailable
from throttle.store import Decision
from throttle.store.aio import BATCH, AsyncStore
from throttle.store.base import short_reply
from throttle.store.redis import script_source

LIMIT = Limit("requests", "100/h")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of the test's own: it changes the server's users and scripts."""
    with RedisServer() as started:
        yield started


def _admit_all(store: AsyncStore, count: int) -> list[object]:
    """``count`` admissions at once on one loop; each one's decision, or its error."""

    async def run() -> list[object]:
        asks = [store.admit([LIMIT], {"api_key": "k"}) for _ in range(count)]
        # Bounded, so that an admission left waiting fails the test instead of hanging it.
        found = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 30)
        await store.aclose()
        return list(found)

    return asyncio.run(run())


def test_admissions_meeting_a_flushed_script_are_each_decided_once(server: RedisServer) -> None:
    """Twenty admissions in flight when the script is gone: it is loaded again once, each is
    sent again and decided, and the bucket is charged twenty times, not forty."""
    store = RedisStore(server.client(), Keyspace(SECRET))
    store.load_scripts()
    server.client().script_flush()
    decisions = _admit_all(AsyncStore(store), 20)
    assert all(getattr(d, "allowed", False) for d in decisions), decisions
    left = sorted(round(d.limits[0].remaining) for d in decisions)  # type: ignore[attr-defined]
    assert left == list(range(80, 100))
    assert store.peek([LIMIT], {"api_key": "k"}).limits[0].remaining < 81


def test_a_reload_refused_fails_every_waiting_admission(server: RedisServer) -> None:
    """When the script cannot be loaded again (this user may not load scripts), every
    admission that met the loss gets a StoreError instead of waiting for ever, and nothing is
    charged; once the script is back, admissions go through on the same store."""
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "door", "on", ">door-pw", "~*", "+@all", "-script|load")
    store = RedisStore(server.client(username="door", password="door-pw"), Keyspace(SECRET))
    for name in ("admit", "settle", "load", "upstream", "sample"):
        admin.script_load(script_source(name))
    admin.script_flush()
    waiting = AsyncStore(store)
    errors = _admit_all(waiting, 10)
    assert all(isinstance(e, StoreError) for e in errors), errors
    assert "NOPERM" in str(errors[0]) or "permission" in str(errors[0]).lower()
    assert admin.keys("*") == []  # nothing charged
    admin.script_load(script_source("admit"))
    decisions = _admit_all(waiting, 3)
    assert [round(d.limits[0].remaining) for d in decisions] == [99, 98, 97]  # type: ignore[attr-defined]


def test_admissions_of_one_turn_go_out_every_batch_and_are_each_answered(
    server: RedisServer,
) -> None:
    """Forty admissions asked in one turn of the loop go out in writes of at most BATCH
    frames, the last at the turn's end: each gets its own reply, in the order asked."""
    store = RedisStore(server.client(), Keyspace(SECRET))
    waiting = AsyncStore(store, timeout=5)  # (the test's own bound is wait_for's)
    writes: list[int] = []  # EVALSHA frames per write

    async def run() -> list[float]:
        await waiting.admit([LIMIT], {"api_key": "k"})  # connects
        pipe = waiting._pipe_for(store)
        assert pipe is not None
        send = pipe.link.send

        def counted(data: bytes) -> None:
            writes.append(data.count(b"EVALSHA"))
            send(data)

        pipe.link.send = counted
        asks = [waiting.admit([LIMIT], {"api_key": "k"}) for _ in range(40)]
        # Before the loop turns: only the full batches are out.
        assert writes == [BATCH] * (40 // BATCH)
        found = await asyncio.wait_for(asyncio.gather(*asks), 30)
        await waiting.aclose()
        return [d.limits[0].remaining for d in found]

    left = asyncio.run(run())
    assert writes == [BATCH] * (40 // BATCH) + [40 % BATCH]
    assert [round(r) for r in left] == list(range(98, 58, -1))


@pytest.mark.parametrize("error", [OSError("connection reset"), ValueError("a bug")])
def test_a_write_that_fails_mid_turn_fails_every_admission_waiting(
    server: RedisServer, error: Exception
) -> None:
    """When the second of three writes in one turn fails, every admission sent or queued on
    the connection by then is told (none is left waiting); those asked after it connect
    again and are answered."""
    store = RedisStore(server.client(), Keyspace(SECRET))
    waiting = AsyncStore(store, timeout=5)

    async def run() -> tuple[list[object], float]:
        await waiting.admit([LIMIT], {"api_key": "k"})  # connects
        pipe = waiting._pipe_for(store)
        assert pipe is not None
        send = pipe.link.send
        writes = []

        def failing(data: bytes) -> None:
            writes.append(data)
            if len(writes) == 2:
                raise error
            send(data)

        pipe.link.send = failing
        asks = [waiting.admit([LIMIT], {"api_key": "k"}) for _ in range(40)]
        found = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 30)
        again = await asyncio.wait_for(waiting.admit([LIMIT], {"api_key": "k"}), 30)
        await waiting.aclose()
        return list(found), again.limits[0].remaining

    found, remaining = asyncio.run(run())
    told = 2 * BATCH
    expected = StoreUnavailable if isinstance(error, OSError) else StoreError
    assert [type(f) for f in found[:told]] == [expected] * told, found
    assert all(getattr(f, "allowed", False) for f in found[told:]), found
    # The first write's admissions may have run in Redis before the connection was closed,
    # the failed write's did not; the rest, and the one after them, did.
    ran = 1 + (40 - told) + 1
    assert 100 - ran - BATCH <= round(remaining) <= 100 - ran


def test_send_hands_over_the_packed_admission_and_its_raw_reply(server: RedisServer) -> None:
    """``send`` sends on an open connection only (None, and nothing charged, before it is
    open or with no loop running); its future is the script's reply, which ``finish`` or
    ``finish_peek`` makes the decision ``admit`` or ``peek`` would have given."""
    store = RedisStore(server.client(), Keyspace(SECRET))
    waiting = AsyncStore(store, timeout=5)
    tight = Limit("tight", "2/h")
    identity = {"api_key": "k"}
    assert waiting.send([LIMIT], identity) is None  # no loop running

    async def run() -> list[tuple[bool, Decision]]:
        assert waiting.send([LIMIT], identity) is None  # not connected yet
        await waiting.admit([LIMIT], identity)  # connects: 99 left
        answers = []
        asks = [([LIMIT], False), ([LIMIT], True), *[([tight], False)] * 3]
        for limits, peek in asks:
            sent = waiting.send(limits, identity, peek=peek)
            assert sent is not None
            prepared, future = sent
            reply = await asyncio.wait_for(future, 30)
            finish = store.finish_peek if peek else store.finish
            answers.append((short_reply(reply, len(prepared.charges)), finish(prepared, reply)))
        await waiting.aclose()
        return answers

    answers = asyncio.run(run())
    assert [short for short, _ in answers] == [True, True, True, True, False]
    decisions = [d for _, d in answers]
    assert [d.allowed for d in decisions] == [True, True, True, True, False]
    assert [round(d.limits[0].remaining) for d in decisions[:2]] == [98, 98]
    assert decisions[-1].bound_by == "tight"
    assert decisions[-1].retry_after > 0
    assert round(store.peek([LIMIT], identity).limits[0].remaining) == 98  # the peek took none
