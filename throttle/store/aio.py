# SPDX-License-Identifier: MIT
"""Admissions from an asyncio event loop, without blocking it.

:class:`AsyncStore` wraps a store for async callers (the ASGI middleware). On a single Redis
server every admission is sent on one connection of the loop's own without waiting for the
one before: the script runs are pipelined, their replies come back in order and each wakes
the request that asked. A request costs the loop the packing of its frame and the reading of
its reply, never a round trip of idle time.

Anything unusual falls back to what the store does itself: a script Redis lost (after
``SCRIPT FLUSH`` or a restart) is loaded again in a thread and the admission sent again; an
admission that spans several Redis Cluster slots, or any store that is not a single Redis
server, runs in a thread (:class:`~throttle.store.MemoryStore`, which never waits on I/O,
runs inline). A reply that does not come within ``timeout`` raises
:class:`~throttle.errors.StoreUnavailable` for every request waiting on the connection, and
the connection is closed: a late reply can then never be read as another request's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from throttle.errors import ConfigurationError, StoreError, StoreUnavailable
from throttle.limits import Limit
from throttle.store.base import BaseStore, Decision, Prepared
from throttle.store.memory import MemoryStore
from throttle.store.redis import RedisStore, readable

__all__ = ["AsyncStore"]

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class AsyncStore:
    """``store``'s admissions and peeks as coroutines (see the module docstring).

    Use it from one event loop at a time; it opens its connection on first use and again on
    the loop it is next used from. ``timeout`` (seconds) is how long a reply may take.
    """

    def __init__(self, store: BaseStore, *, timeout: float = 0.25) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError("timeout", f"must be seconds > 0, got {timeout!r}")
        self.store = store
        self.timeout = float(timeout)
        self._pipe: _Pipe | None = None

    async def admit(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
    ) -> Decision:
        """:meth:`BaseStore.admit <throttle.store.BaseStore.admit>` without reservations."""
        return await self._run(limits, identity, cost, adaptive, peek=False)

    async def peek(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
    ) -> Decision:
        """:meth:`BaseStore.peek <throttle.store.BaseStore.peek>`: charge nothing."""
        return await self._run(limits, identity, cost, adaptive, peek=True)

    async def aclose(self) -> None:
        """Close the connection (requests still waiting get :class:`StoreUnavailable`)."""
        if self._pipe is not None:
            self._pipe.fail(StoreUnavailable("the store was closed"))
            self._pipe = None

    async def _run(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        cost: float | Mapping[str, float],
        adaptive: bool,
        *,
        peek: bool,
    ) -> Decision:
        store = self.store
        if isinstance(store, MemoryStore):
            method = store.peek if peek else store.admit
            return method(limits, identity, cost=cost, adaptive=adaptive)
        pipe = self._pipe_for(store)
        prepared = None
        if pipe is not None:
            prepared = store.prepare(limits, identity, cost=cost, adaptive=adaptive, peek=peek)
        if not isinstance(prepared, Prepared) or pipe is None:
            method = store.peek if peek else store.admit
            return await asyncio.to_thread(method, limits, identity, cost=cost, adaptive=adaptive)
        finish = store.finish_peek if peek else store.finish
        try:
            reply = await pipe.call(pipe.encode(prepared))
        except NoScriptError:
            # Nothing ran: load the scripts (a blocking call, so in a thread) and send again.
            await asyncio.to_thread(_load_scripts, store)
            reply = await pipe.call(pipe.encode(prepared))
        return finish(prepared, reply)

    def _pipe_for(self, store: BaseStore) -> _Pipe | None:
        loop = asyncio.get_running_loop()
        pipe = self._pipe
        if pipe is not None and pipe.loop is loop:
            return pipe
        if pipe is not None:  # used from another loop now: the old one may be gone
            pipe.abandon()
            self._pipe = None
        if not isinstance(store, RedisStore):
            return None
        link = store.pipeline()
        if link is None:  # a cluster: its client routes each admission
            return None
        self._pipe = _Pipe(loop, *link, self.timeout)
        return self._pipe


def _load_scripts(store: BaseStore) -> None:
    if isinstance(store, RedisStore):
        store.load_scripts()


class _Waiting(NamedTuple):
    future: asyncio.Future[Any]
    sent: float  # the loop's time when the request was sent


class _Pipe:
    """One pipelined connection, read by the event loop (see :class:`AsyncStore`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, link: Any, encode: Any, timeout: float):
        self.loop = loop
        self.link = link
        self.encode = encode
        self.timeout = timeout
        self.fd: int | None = None
        self.pending: deque[_Waiting] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Future[None] | None = None

    async def call(self, frame: bytes) -> Any:
        """Send one script run and wait for its reply (an error reply is raised)."""
        if self.fd is None:
            await self._connect()
        future: asyncio.Future[Any] = self.loop.create_future()
        # Sent at once rather than gathered for one write per turn of the loop: Redis then
        # works on the first request while this loop reads the next, instead of the requests
        # moving in lockstep batches with the server idle during each batch's round trip.
        try:
            self.link.send(frame)
        except _UNAVAILABLE as exc:
            self.fail(StoreUnavailable(f"Redis did not answer: {exc}"))
            raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
        self.pending.append(_Waiting(future, self.loop.time()))
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._expire)
        return await future

    async def _connect(self) -> None:
        # Connecting blocks (DNS, TCP, TLS, AUTH): done in a thread, once for all callers.
        if self._connecting is None:
            self._connecting = self.loop.create_future()
            try:
                fd = await asyncio.to_thread(self.link.fileno)
            except BaseException as exc:
                error = StoreUnavailable(f"Redis did not answer: {exc}")
                self._connecting.set_exception(error)
                self._connecting.exception()  # retrieved: nobody else may be waiting
                self._connecting = None
                if isinstance(exc, _UNAVAILABLE):
                    raise error from exc
                raise
            self.fd = fd
            self.loop.add_reader(fd, self._on_readable)
            self._connecting.set_result(None)
            self._connecting = None
        else:
            await asyncio.shield(self._connecting)

    def _on_readable(self) -> None:
        if not self.pending:
            # Readable with nothing asked: the server closed the connection. Drop it, or the
            # loop would call back here for ever.
            self.fail(StoreUnavailable("Redis closed the connection"))
            return
        try:
            replies = self.link.ready()
        except _UNAVAILABLE as exc:
            self.fail(StoreUnavailable(f"Redis did not answer: {exc}"))
            return
        for reply in replies:
            if not self.pending:  # a reply nobody asked for: the connection is not ours
                self.fail(StoreUnavailable("unexpected reply from Redis"))
                return
            future = self.pending.popleft().future
            if future.done():  # its caller was cancelled (the client went away)
                continue
            if isinstance(reply, NoScriptError):
                future.set_exception(reply)
            elif isinstance(reply, RedisConnectionError):  # LOADING, MASTERDOWN, TRYAGAIN
                future.set_exception(StoreUnavailable(str(reply)))
            elif isinstance(reply, RedisError):
                future.set_exception(StoreError(f"Redis refused the throttle script: {reply}"))
            elif not isinstance(reply, list):
                future.set_exception(StoreError(f"unexpected reply from Redis: {reply!r}"))
            else:
                future.set_result(reply)

    def _expire(self) -> None:
        """No reply within the timeout: the store is as good as down. After the loop was busy
        past the timeout, replies that came meanwhile are read first: only what is still
        missing counts as unanswered."""
        self.timer = None
        if self.pending and self.fd is not None and readable(self.fd):
            self._on_readable()
        if not self.pending:
            return
        waited = self.loop.time() - self.pending[0].sent
        if waited >= self.timeout:
            self.fail(StoreUnavailable(f"no answer from Redis within {self.timeout:g} s"))
        else:
            self.timer = self.loop.call_later(self.timeout - waited, self._expire)

    def fail(self, error: StoreUnavailable) -> None:
        """Close the connection; every request waiting on it gets ``error``."""
        waiting = list(self.pending)
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
            self.fd = None
        self.link.close()
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(error)

    def abandon(self) -> None:
        """Drop the connection of a loop that is no longer the one in use (it may be closed:
        nothing is asked of it)."""
        self.pending.clear()
        self.fd = None
        self.timer = None
        self.link.close()
