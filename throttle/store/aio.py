# SPDX-License-Identifier: MIT
"""Admissions from an asyncio event loop, without blocking it.

:class:`AsyncStore` wraps a store for async callers (the ASGI middleware). On a single Redis
server every admission is sent on one connection of the loop's own without waiting for the
one before: the script runs are pipelined, their replies come back in order and each wakes
the request that asked. A request costs the loop the packing of its frame and the reading of
its reply, never a round trip of idle time. The admissions asked in one turn of the loop go
out in one write at its end, or every :data:`BATCH` of them when there are more, so that
Redis works on the first while the loop is still busy with the rest.

Anything unusual falls back to what the store does itself: a script Redis lost (after
``SCRIPT FLUSH`` or a restart) is loaded again in a thread, once for all the requests that
met it, and their admissions sent again; an admission that spans several Redis Cluster slots,
a store that is not a single Redis server, and a connection that cannot be read without
blocking (TLS, RESP3, no ``hiredis``) run in a thread (:class:`~throttle.store.MemoryStore`,
which never waits on I/O, runs inline). Connecting happens in a thread too, bounded by
``timeout``. A reply that does not come within ``timeout`` raises
:class:`~throttle.errors.StoreUnavailable` for every request waiting on the connection, and
the connection is closed: a late reply can then never be read as another request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from throttle.errors import ConfigurationError, StoreError, StoreUnavailable
from throttle.limits import Limit
from throttle.store.base import BaseStore, Decision, Packed, Prepared, _new
from throttle.store.memory import MemoryStore
from throttle.store.redis import _UNAVAILABLE, RedisStore, readable

__all__ = ["AsyncStore"]

#: At most this many admissions go out in one write. A busy server takes many requests in one
#: turn of its loop; sent all at its end, their admissions keep Redis idle while the loop
#: works, then the loop idle while Redis does (with 32 connections to a bare Starlette app on
#: uvloop, the server waited on Redis 15% of the time). Sent every 16, a write (one system
#: call, about 15 us here) costs each admission under 1 us, and the throttled servers of
#: ``benchmarks/edge.py`` answered 3% to 15% more requests per second (2026-11-28).
BATCH: Final = 16


class AsyncStore:
    """``store``'s admissions and peeks as coroutines (see the module docstring).

    Each event loop it is used from gets a connection of its own, opened on first use.
    ``timeout`` (seconds) is how long connecting, or a reply, may take.
    """

    def __init__(self, store: BaseStore, *, timeout: float = 0.25) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError("timeout", f"must be seconds > 0, got {timeout!r}")
        self.store = store
        self.timeout = float(timeout)
        self._pipes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pipe] = (
            weakref.WeakKeyDictionary()
        )
        self._last: _Pipe | None = None  # the pipe used last (its loop's)

    def admit(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
    ) -> Awaitable[Decision]:
        """:meth:`BaseStore.admit <throttle.store.BaseStore.admit>` without reservations.

        On an open connection the admission is sent by this call, and the coroutine returned
        waits for its reply: await it. Bad input is raised by the call."""
        return self._start(limits, identity, cost, adaptive, False)

    def peek(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
    ) -> Awaitable[Decision]:
        """:meth:`BaseStore.peek <throttle.store.BaseStore.peek>`: charge nothing."""
        return self._start(limits, identity, cost, adaptive, True)

    def send(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
        peek: bool = False,
    ) -> tuple[Prepared, asyncio.Future[Any]] | None:
        """Send an admission (a peek with ``peek``) on the running loop's connection when it
        is open and read directly, as :meth:`admit` (:meth:`peek`) would, for a caller that
        reads the reply itself: the admission as packed, and the future of the script's
        reply (:meth:`BaseStore.finish <throttle.store.BaseStore.finish>`, or ``finish_peek``,
        makes it a decision; it fails with :class:`StoreError`). None, and nothing checked or
        sent, when it cannot go so (not connected yet, not one Redis server, a connection that
        cannot be read without blocking, no loop running): :meth:`admit` then does the rest.
        Bad input raises here when it would be sent."""
        pipe = self._open_pipe()
        if pipe is None:
            return None
        prepared = self.store._prepare(
            limits, identity, cost, False, None, None, None, adaptive, None, peek
        )
        if type(prepared) is not Prepared:  # (a pipe is one Redis server's: never so)
            return None
        return prepared, pipe.submit(prepared)

    def send_packed(self, packed: Packed) -> tuple[Prepared, asyncio.Future[Any]] | None:
        """:meth:`send` for an admission the store packed ahead (see :meth:`BaseStore.pack
        <throttle.store.BaseStore.pack>`), filled in with a nonce of its own; None, and
        nothing filled or sent, when it cannot go so."""
        pipe = self._open_pipe()
        if pipe is None:
            return None
        prepared = self.store.fill(packed)
        return prepared, pipe.submit(prepared)

    def _open_pipe(self) -> _Pipe | None:
        """The running loop's connection when it is open and read directly, else None."""
        pipe = self._last
        try:
            if pipe is None or pipe.loop is not asyncio.get_running_loop():
                pipe = self._pipe_for(self.store)
        except RuntimeError:  # no loop running
            return None
        if pipe is None or pipe.fd is None or not pipe.direct:
            return None
        return pipe

    async def aclose(self) -> None:
        """Close this loop's connection (requests still waiting on it get
        :class:`StoreUnavailable`)."""
        pipe = self._pipes.pop(asyncio.get_running_loop(), None)
        if pipe is self._last:
            self._last = None
        if pipe is not None:
            pipe.fail(StoreUnavailable("the store was closed"))

    def _start(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        cost: float | Mapping[str, float],
        adaptive: bool,
        peek: bool,
    ) -> Awaitable[Decision]:
        """On an open connection read directly (nearly always), the admission is sent from
        here (:meth:`send`), and only its reply is awaited (:meth:`_decide`). Anything else is
        :meth:`_run`'s."""
        sent = self.send(limits, identity, cost=cost, adaptive=adaptive, peek=peek)
        if sent is not None:
            return self._decide(sent[1], sent[0], peek)
        store = self.store
        try:
            pipe = self._pipe_for(store)
        except RuntimeError:  # no loop running yet: then it runs in a thread
            pipe = None
        prepared = None
        if pipe is not None and pipe.direct is not False:  # sent once connected
            prepared = store._prepare(
                limits, identity, cost, False, None, None, None, adaptive, None, peek
            )
        return self._run(pipe, prepared, (limits, identity, cost, adaptive, peek))

    async def _decide(self, reply: Awaitable[Any], prepared: Prepared, peek: bool) -> Decision:
        # The reply is read into a decision here, in the request's own step, not by the
        # connection's reader when it arrives: a decision made there would live on until the
        # request's next step, and objects alive across turns of the loop are what makes the
        # garbage collector run often, and promote (about 5 us more per request, measured).
        store = self.store
        return (store.finish_peek if peek else store.finish)(prepared, await reply)

    async def _run(self, pipe: _Pipe | None, prepared: object, call: tuple[Any, ...]) -> Decision:
        """An admission :meth:`_start` could not send itself: on a connection to open first,
        or (one that spans several cluster slots, a store that is not one Redis server, a
        connection that cannot be read without blocking) by the store itself, in a thread."""
        limits, identity, cost, adaptive, peek = call
        store = self.store
        if pipe is not None and type(prepared) is Prepared:
            try:
                return await self._decide(pipe.call(prepared), prepared, peek)
            except _Blocking:  # this connection cannot be read without blocking the loop
                pass
        method = store.peek if peek else store.admit
        if isinstance(store, MemoryStore):  # never waits on I/O
            return method(limits, identity, cost=cost, adaptive=adaptive)
        return await asyncio.to_thread(method, limits, identity, cost=cost, adaptive=adaptive)

    def _pipe_for(self, store: BaseStore) -> _Pipe | None:
        loop = asyncio.get_running_loop()
        pipe = self._last
        if pipe is not None and pipe.loop is loop:  # nearly always: one loop, or the same again
            return pipe
        pipe = self._pipes.get(loop)
        if pipe is not None:
            self._last = pipe
            return pipe
        if not isinstance(store, RedisStore):
            return None
        link = store.pipeline()
        if link is None:  # a cluster: its client routes each admission
            return None
        pipe = self._pipes[loop] = self._last = _Pipe(loop, *link, self.timeout, store)
        return pipe


def _load_scripts(store: BaseStore) -> None:
    if isinstance(store, RedisStore):
        store.load_scripts()


class _Blocking(Exception):
    """The connection is one redis-py reads itself (TLS, RESP3, no hiredis): it would block."""


class _Waiting(NamedTuple):
    future: asyncio.Future[Any]  # the script's reply
    sent: float  # the loop's time when the request was sent
    prepared: Prepared
    again: bool  # sent again after Redis lost the script: losing it again is an error


class _Pipe:
    """One pipelined connection, read by the event loop (see :class:`AsyncStore`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        link: Any,  # throttle.store.redis._Link
        encode: Callable[[Prepared], bytes],
        timeout: float,
        store: BaseStore,
    ) -> None:
        self.loop = loop
        self.link = link
        self.encode = encode
        self.timeout = timeout
        self.store = store
        self.fd: int | None = None
        #: Whether the connection is read straight off its socket (None: not connected yet).
        self.direct: bool | None = None
        self.pending: deque[_Waiting] = deque()
        self.out: list[bytes] = []  # frames not sent yet (see _send)
        self.due = False  # whether sending them at the end of this turn is scheduled
        self.timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._loading: asyncio.Task[None] | None = None
        self._reloading: list[_Waiting] = []  # what met a lost script, to send once it is loaded

    async def call(self, prepared: Prepared) -> Any:
        """Send one admission, connecting first if need be, and wait for its reply."""
        while self.fd is None:
            await self._connect()
        if not self.direct:
            raise _Blocking
        return await self.submit(prepared)

    def submit(self, prepared: Prepared) -> asyncio.Future[Any]:
        """Send one admission on the open connection, read directly: its reply (the script's
        answer, or the error) will be the future's."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self._send(_new(_Waiting, (future, self.loop.time(), prepared, False)))
        return future

    def _send(self, item: _Waiting) -> None:
        # Requests made in one turn of the loop go out in one write at its end (one system
        # call for all of them here, and one read for Redis), or every BATCH of them.
        if not self.due:
            self.due = True
            self.loop.call_soon(self._flush)
        out = self.out
        out.append(item.prepared.frame or self.encode(item.prepared))
        self.pending.append(item)
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._expire)
        if len(out) >= BATCH:
            self._write()

    def _flush(self) -> None:
        self.due = False
        self._write()

    def _write(self) -> None:
        data = b"".join(self.out)
        self.out.clear()
        if not data or self.fd is None:  # failed meanwhile: its requests were told
            return
        try:
            self.link.send(data)
        except _UNAVAILABLE as exc:
            self.fail(StoreUnavailable(f"Redis did not answer: {exc}"))
        except Exception as exc:  # whatever it is, every request waiting must hear of it
            self.fail(StoreError(f"could not send to Redis: {exc!r}"))

    def _reload(self, item: _Waiting) -> None:
        """Redis lost the script (``SCRIPT FLUSH``, a restart): nothing ran. It is loaded again
        (a blocking call, so in a thread; once for every request that met the loss meanwhile)
        and those requests are sent again."""
        self._reloading.append(item)
        if self._loading is None:
            self._loading = self.loop.create_task(self._load())

    async def _load(self) -> None:
        # Until the load is done, what the waiting requests hear if it never is (cancelled).
        error: StoreError | None = StoreUnavailable("loading the throttle scripts was cancelled")
        try:
            await asyncio.to_thread(_load_scripts, self.store)
            error = None
        except StoreError as exc:
            error = exc
        except Exception as exc:  # whatever it is, the waiting requests must hear of it
            error = StoreError(f"could not load the throttle scripts: {exc!r}")
        finally:
            self._loading = None
            waiting, self._reloading = self._reloading, []
            for item in waiting:
                if item.future.done():
                    continue
                if error is None and self.fd is None:
                    error = StoreUnavailable("the connection to Redis closed meanwhile")
                if error is not None:
                    item.future.set_exception(error)
                else:  # sent again now: its wait for a reply starts again too
                    self._send(item._replace(again=True, sent=self.loop.time()))

    async def _connect(self) -> None:
        """Connect (in a thread: DNS, TCP, TLS and AUTH block) once for every caller waiting,
        within the timeout. The connecting is a task of its own, so a caller that is cancelled
        (its client went away) cancels only its own wait."""
        if self._connecting is None:
            self._connecting = self.loop.create_task(self._open())
        try:
            await asyncio.wait_for(asyncio.shield(self._connecting), self.timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"could not connect to Redis within {self.timeout:g} s") from exc

    async def _open(self) -> None:
        try:
            fd = await asyncio.to_thread(self.link.fileno)
        except _UNAVAILABLE as exc:
            self.link.close()
            raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
        except Exception as exc:  # refused at connection (AUTH, SELECT, HELLO)
            self.link.close()
            raise StoreError(f"Redis refused the connection: {exc}") from exc
        finally:
            self._connecting = None
        self.direct = self.link.direct
        self.fd = fd
        if self.direct:
            self.loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        if not self.pending:
            # Readable with nothing asked: the server closed the connection. Drop it, or the
            # loop would call back here for ever.
            self.fail(StoreUnavailable("Redis closed the connection"))
            return
        try:
            replies = self.link.ready()
        except Exception as exc:  # a reader callback must not raise: fail the waiters instead
            self.fail(StoreUnavailable(f"Redis did not answer: {exc}"))
            return
        for reply in replies:
            if not self.pending:  # a reply nobody asked for: the connection is not ours
                self.fail(StoreUnavailable("unexpected reply from Redis"))
                return
            item = self.pending.popleft()
            future = item.future
            if future.done():  # its caller was cancelled (the client went away)
                continue
            if type(reply) is list:  # the script's answer: nearly always
                future.set_result(reply)
            elif isinstance(reply, NoScriptError):
                if item.again:
                    error = StoreError(f"Redis lost the throttle script again: {reply}")
                    future.set_exception(error)
                else:
                    self._reload(item)
            elif isinstance(reply, RedisConnectionError):  # LOADING, MASTERDOWN, TRYAGAIN
                future.set_exception(StoreUnavailable(str(reply)))
            elif isinstance(reply, RedisError):
                future.set_exception(StoreError(f"Redis refused the throttle script: {reply}"))
            else:
                future.set_exception(StoreError(f"unexpected reply from Redis: {reply!r}"))

    def _expire(self) -> None:
        """No reply within the timeout: the store is as good as down. After the loop was busy
        past the timeout, every reply that came meanwhile is read first: only what is still
        missing counts as unanswered."""
        self.timer = None
        while self.pending and self.fd is not None and readable(self.fd):
            self._on_readable()
        if not self.pending:
            return
        waited = self.loop.time() - self.pending[0].sent
        if waited >= self.timeout:
            self.fail(StoreUnavailable(f"no answer from Redis within {self.timeout:g} s"))
        else:
            self.timer = self.loop.call_later(self.timeout - waited, self._expire)

    def fail(self, error: StoreError) -> None:
        """Close the connection; every request waiting on it gets ``error``."""
        waiting = [*self.pending, *self._reloading]
        self.pending.clear()
        self._reloading.clear()
        self.out.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd is not None:
            if self.direct:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(self.fd)
            self.fd = None
        self.link.close()
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(error)
