# SPDX-License-Identifier: MIT
"""The Redis store: every admission is one ``EVALSHA`` of ``lua/admit.lua`` on the server's clock.

On a single Redis server all limits of an admission go into one script run, one round trip.
On Redis Cluster the keys of one tenant share a hash tag and so one slot; a global limit lives in
its own slot and is admitted by a second run, which refunds the first when it denies.

The hot path avoids redis-py's per-command machinery: each thread keeps its own connection
(built from the client's pool settings, so TLS, ACL users and timeouts apply), the command frame
is packed here, and the reply is read straight off the parser. When the server does not know the
script (after ``SCRIPT FLUSH`` or a restart) the call falls back to redis-py's ``Script``, which
loads it and runs it again. Give the client a short ``socket_timeout`` where a decision must
never block for long (a worker's event loop): a timeout raises :class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import ssl
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple, NoReturn

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from throttle.clock import Clock, SystemClock
from throttle.errors import ConfigurationError, StoreError, StoreUnavailable
from throttle.identity import Keyspace
from throttle.store._engine import fmt
from throttle.store.base import BaseStore, Prepared, _text

_hiredis: Any
try:
    import hiredis as _hiredis
except ImportError:  # redis[hiredis] installs it; without it the store still works
    _hiredis = None

__all__ = ["RedisStore", "script_source"]

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
#: What the store treats as Redis not answering: the above, and what a cluster client raises
#: while a slot has no master to serve it (between a master's death and its replica's
#: promotion the whole cluster answers CLUSTERDOWN) or is being moved (TRYAGAIN).
_DOWN = (*_UNAVAILABLE, ClusterDownError, ClusterError, TryAgainError, SlotNotCoveredError)
#: What it treats as Redis refusing. The cluster client's own errors are not RedisErrors: left
#: out, they would escape the store, and the gate would run the task unchecked.
_REFUSED = (RedisError, RedisClusterException)


def script_source(name: str) -> str:
    """The source of one of the shipped scripts, with the shared helpers prepended."""
    lua = resources.files("throttle.store") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class RedisStore(BaseStore):
    """Admissions against Redis (a server or a cluster); see :class:`BaseStore` for the API.

    ``client`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster``. Its pool settings are
    reused; its ``decode_responses`` setting does not matter.

    On a cluster the load factor lives in a slot of its own, which an admission's script cannot
    read: adaptive admissions there use the factor as last read, at most ``load_refresh``
    seconds old (by ``clock``).
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        keyspace: Keyspace,
        *,
        booking_grace: float = 600.0,
        clock: Clock | None = None,
        load_refresh: float = 1.0,
    ) -> None:
        super().__init__(keyspace, booking_grace=booking_grace)
        if not isinstance(load_refresh, int | float) or not load_refresh > 0:
            raise ConfigurationError("load_refresh", f"must be seconds > 0, got {load_refresh!r}")
        self.client = client
        self.clock: Clock = clock or SystemClock()
        self._load_refresh_us = round(load_refresh * 1_000_000)
        self._load_read = (-1 << 62, "1")  # (when, the factor as read)
        self._cluster = self.sharded = isinstance(client, RedisCluster)
        # Script objects handle NOSCRIPT by loading and retrying (on every node of a cluster).
        # redis-py before 8 annotates Script for Redis only, though it runs on RedisCluster too.
        registrar: Any = client
        self._admit_script = Script(registrar, script_source("admit"))
        self._settle_script = Script(registrar, script_source("settle"))
        self._load_script = Script(registrar, script_source("load"))
        self._upstream_script = Script(registrar, script_source("upstream"))
        self._sample_script = Script(registrar, script_source("sample"))
        lua = resources.files("throttle.store") / "lua"
        self._heartbeat_script = Script(registrar, (lua / "heartbeat.lua").read_text())
        self._guard_script = Script(registrar, (lua / "guard.lua").read_text())
        self._fast = None if isinstance(client, RedisCluster) else _FastPath(client)
        self._starts: dict[tuple[int, int], bytes] = {}
        self._heads: dict[tuple[str, ...], tuple[bytes, bytes]] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self.keyspace!r}, cluster={self._cluster})"

    def _slot(self, tag: str) -> Hashable:
        return key_slot(tag.encode()) if self._cluster else None

    def _load_source(self) -> str:
        if not self._cluster:
            return "k"
        now = self.clock.now_us()
        read_at, value = self._load_read
        if now - read_at >= self._load_refresh_us:
            found = self._get_number(self.keyspace.load_factor_key())
            value = "1" if found is None else fmt(found)  # none, or not written by throttle
            self._load_read = (now, value)
        return value

    def _run_admit(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        return self._run_list(self._admit_script, keys, argv, "admission")

    def _encode_args(
        self, argv: Sequence[str], argv_adaptive: Sequence[str]
    ) -> tuple[bytes, int, bytes, int] | None:
        if self._fast is None:
            return None
        packed = _pack(argv)
        adaptive = packed if argv_adaptive is argv else _pack(argv_adaptive)
        return packed, len(argv), adaptive, len(argv_adaptive)

    def _encode_keys(
        self, keys: Sequence[str], args: tuple[bytes, int, bytes, int] | None
    ) -> _Wire | None:
        return None if args is None else tuple.__new__(_Wire, (_pack(keys), len(keys), *args))

    def _keys_text(self, wire: _Wire) -> str:
        return wire.keys.decode("ascii")  # validated prefixes and names, and fingerprints

    def _with_keys(self, args: tuple[bytes, int, bytes, int], text: str, nkeys: int) -> _Wire:
        return tuple.__new__(_Wire, (text.encode(), nkeys, *args))

    def _encode_call(
        self, wire: _Wire, nextra: int, head: list[str], fspec: str, adaptive: bool
    ) -> tuple[bytes, bytes, bytes]:
        if adaptive:
            tail, ntail = wire.argv_adaptive, wire.nargv_adaptive
        else:
            tail, ntail = wire.argv, wire.nargv
        nkeys = wire.nkeys + nextra
        # The parts that recur from call to call are packed once: the array header up to the
        # key count (by the counts), and the head's arguments around the nonce (by their
        # values, unless a test's clock or a deferral guard makes them one-offs).
        shape = (nkeys, ntail)
        start = self._starts.get(shape)
        if start is None:
            count = 3 + nkeys + len(head) + 1 + ntail
            sha = self._admit_script.sha
            start = (
                f"*{count}\r\n$7\r\nEVALSHA\r\n$40\r\n{sha}\r\n${len(str(nkeys))}\r\n{nkeys}\r\n"
            ).encode()
            if len(self._starts) < 64:
                self._starts[shape] = start
        around = (*head[:4], head[5], fspec)
        packed = self._heads.get(around) if not head[0] and not head[6] else None
        if packed is None:
            packed = _pack(head[:4]), _pack([head[5], head[6], fspec])
            if not head[0] and not head[6] and len(self._heads) < 64:
                self._heads[around] = packed
        return start, packed[0], packed[1] + tail

    def _run_prepared(self, prepared: Prepared) -> Sequence[Any]:
        frame = prepared.frame
        if frame is None or self._fast is None:
            return self._run_admit(prepared.keys, prepared.argv)
        reply = self._run(self._admit_script, prepared.keys, prepared.argv, frame)
        if not isinstance(reply, list):
            raise StoreError(f"unexpected reply from the admission script: {reply!r}")
        return reply

    def _run_settle(self, keys: list[str], argv: list[str]) -> object:
        return self._run(self._settle_script, keys, argv)

    def _run_load(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        return self._run_list(self._load_script, keys, argv, "load", length=3)

    def _run_upstream(self, keys: list[str], argv: list[str]) -> object:
        return self._run(self._upstream_script, keys, argv)

    def _run_sample(self, keys: list[str], argv: list[str]) -> Sequence[Any]:
        return self._run_list(self._sample_script, keys, argv, "sample")

    def _run_list(
        self, script: Script, keys: list[str], argv: list[str], name: str, length: int = -1
    ) -> list[Any]:
        """Run a script whose reply is a list (of ``length`` items, when given)."""
        reply = self._run(script, keys, argv)
        if not isinstance(reply, list) or length not in (-1, len(reply)):
            raise StoreError(f"unexpected reply from the {name} script: {reply!r}")
        return reply

    def _delete(self, keys: list[str]) -> None:
        with _store_errors():
            self.client.delete(*keys)

    def heartbeat(self, member: str, window: float) -> int:
        """Record ``member`` (a worker) as alive and return how many members beat within the
        last ``window`` seconds, on the Redis clock."""
        key = f"{self.keyspace.prefix}:{{~workers}}"
        count = self._run(self._heartbeat_script, [key], [member, str(round(window * 1e6))])
        return int(count)

    def pipeline(self) -> tuple[_Link, Callable[[Prepared], bytes]] | None:
        """For callers that pipeline admissions on a connection of their own (the worker's
        event loop): a new link (see :class:`_Link`) and the function that encodes a prepared
        admission for it; None on a cluster, where admissions go through the cluster client."""
        if self._fast is None:
            return None
        fast = self._fast
        sha = self._admit_script.sha

        def encode(p: Prepared) -> bytes:
            return p.frame if p.frame is not None else fast.frame(sha, p.keys, p.argv)

        return fast.new_link(), encode

    def load_scripts(self) -> None:
        """Load the scripts on the server (after ``SCRIPT FLUSH`` or a restart emptied it)."""
        with _store_errors():
            for script in (
                self._admit_script,
                self._settle_script,
                self._load_script,
                self._upstream_script,
                self._sample_script,
            ):
                sha: Any = self.client.script_load(script.script)
                script.sha = sha.decode() if isinstance(sha, bytes) else str(sha)

    def _set_text(self, key: str, value: str, ttl: float) -> None:
        with _store_errors():
            self.client.set(key, value, px=max(1, round(ttl * 1000)))

    def _set_guard(self, key: str, token: str, after: str, ttl: float) -> bool:
        ttl_ms = str(max(1, round(ttl * 1000)))
        return bool(self._run(self._guard_script, [key], [token, after, ttl_ms]))

    def _get_number(self, key: str) -> float | None:
        with _store_errors():
            value = self.client.get(key)
        try:
            return None if value is None else float(value)  # type: ignore[arg-type]
        except ValueError:
            return None

    def _delete_counted(self, keys: list[str]) -> int:
        with _store_errors():
            if not self._cluster:
                return int(self.client.delete(*keys))  # type: ignore[arg-type]
            return sum(int(self.client.delete(key)) for key in keys)  # type: ignore[arg-type,misc]

    def _scan(self, match: str, most: int) -> tuple[list[str], bool]:
        found: list[str] = []
        with _store_errors():
            for key in self.client.scan_iter(match=match, count=1000):
                if len(found) >= most:
                    return found, False
                found.append(_text(key))
        return found, True

    def _now_us(self) -> int:
        with _store_errors():
            seconds, micros = self.client.time()  # type: ignore[misc]
        return int(seconds) * 1_000_000 + int(micros)

    def _add_counts(self, key: str, counts: Mapping[str, float], ttl: float) -> None:
        # One transaction on a single server: a failure leaves none of the counts applied,
        # so giving them back for the next flush does not count them twice.
        with _store_errors():
            pipe = self.client.pipeline(transaction=not self._cluster)
            for name, amount in counts.items():
                pipe.hincrbyfloat(key, name, amount)
            pipe.expire(key, math.ceil(ttl))
            pipe.execute()

    def _read_counts(self, keys: list[str]) -> list[dict[str, float]]:
        with _store_errors():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            found = pipe.execute()
        return [{_text(k): float(v) for k, v in fields.items()} for fields in found]

    def _run(
        self, script: Script, keys: list[str], argv: list[str], frame: bytes | None = None
    ) -> Any:
        """Run ``script`` (``frame``, when given, is its call as packed for the fast path)."""
        try:
            if self._fast is not None:
                try:
                    if frame is not None:
                        return self._fast.link().call(frame)
                    return self._fast.evalsha(script.sha, keys, argv)
                except NoScriptError:
                    pass  # Script below loads it and runs it again.
            return script(keys=keys, args=argv)
        except _DOWN as exc:
            raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
        except _REFUSED as exc:
            if _cluster_unreachable(exc):
                raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
            raise StoreError(f"Redis refused the throttle script: {exc}") from exc


class _FastPath:
    """One connection per thread (and per process: a forked child opens its own), and a
    hand-packed ``EVALSHA`` frame."""

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        self._factory: Callable[[], Any] = lambda: pool.connection_class(**pool.connection_kwargs)
        self._local = threading.local()

    def link(self) -> _Link:
        """This thread's connection (this process's: a forked child opens its own)."""
        local = self._local
        link: _Link | None = getattr(local, "link", None)
        if link is None or link.pid != os.getpid():
            link = local.link = _Link(self._factory())
        return link

    def frame(self, sha: str, keys: list[str], argv: list[str]) -> bytes:
        """The ``EVALSHA`` command as it goes on the wire."""
        args = [str(len(keys)), *keys, *argv]
        return f"*{2 + len(args)}\r\n$7\r\nEVALSHA\r\n$40\r\n{sha}\r\n".encode() + _pack(args)

    def new_link(self) -> _Link:
        """A connection of its own, with the client's settings (TLS, ACL user, timeouts)."""
        return _Link(self._factory())

    def evalsha(self, sha: str, keys: list[str], argv: list[str]) -> Any:
        return self.link().call(self.frame(sha, keys, argv))


class _Wire(NamedTuple):
    """An admission plan's keys and argv packed for the wire (see :func:`_pack`)."""

    keys: bytes
    nkeys: int
    argv: bytes
    nargv: int
    argv_adaptive: bytes
    nargv_adaptive: int


def _pack(args: Sequence[str]) -> bytes:
    """Arguments as RESP bulk strings, the way they follow a command's array header."""
    # Nearly every argument is ASCII (fingerprints, validated names, numbers): then a character
    # count is a byte count and the lot is built as one string and encoded once.
    text = "".join([f"${len(a)}\r\n{a}\r\n" for a in args])
    data = text.encode("utf-8", "surrogatepass")
    if len(data) == len(text):
        return data
    parts = [a.encode("utf-8", "surrogatepass") for a in args]  # a task id, say, may not be
    return b"".join([b"$%d\r\n%s\r\n" % (len(b), b) for b in parts])


class _Link:
    """A redis-py connection that carries ``EVALSHA`` frames packed by the caller: one at a
    time (:meth:`call`), or several in flight, their replies collected as they arrive
    (:meth:`send`, then :meth:`ready` whenever the socket is readable).

    redis-py connects it (TLS, ACL user, timeouts, ``CLIENT SETNAME``). On a plain TCP or Unix
    socket and with ``hiredis``, requests and replies then go straight over the socket through
    a reply parser of our own, which skips the health checks and per-reply bookkeeping of
    ``read_response`` (about a tenth of a decision's time). Otherwise (TLS, RESP3, no ``hiredis``, a
    redis-py that does not expose the socket) the connection's own methods are used.
    Error replies come back as redis-py exceptions; a broken or timed-out connection is
    closed and raises ``redis.ConnectionError`` or ``redis.TimeoutError``.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        # A forked child opens a connection of its own. (By its pid, not a hook that counts
        # forks: a server that forks its workers in C, as uWSGI does by default, runs none.)
        self.pid = os.getpid()
        self._open = False
        self._sock: Any = None
        self._reader: Any = None

    @property
    def direct(self) -> bool:
        """Whether requests and replies go straight over the socket (once connected): then a
        readable socket can be read without blocking."""
        return self._reader is not None

    def fileno(self) -> int:
        """The socket's descriptor, connecting first if need be."""
        self._connect()
        return int(self.conn._sock.fileno())

    def call(self, frame: bytes) -> Any:
        """Send one request and wait for its reply; an error reply is raised."""
        reader = self._reader
        sent = False
        if reader is None:  # not connected yet, or read by redis-py
            self.send(frame)
            sent = True
            reader = self._reader
            if reader is None:
                try:
                    return self.conn.read_response()
                except BaseException as exc:
                    self._broken(exc)
        # (Straight over the socket, without send() and _recv(): on every admission.)
        sock = self._sock
        try:
            if not sent:
                sock.sendall(frame)
            reply = reader.gets()
            while reply is False:
                data = sock.recv(65536)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                reader.feed(data)
                reply = reader.gets()
        except BaseException as exc:
            self._broken(exc)
        if isinstance(reply, Exception):
            raise _reply_error(str(reply))
        return reply

    def send(self, frame: bytes) -> None:
        try:
            if not self._open:
                self._connect()
            if self._sock is not None:
                self._sock.sendall(frame)
            else:
                self.conn.send_packed_command((frame,), check_health=False)
        except BaseException as exc:
            self._broken(exc)

    def ready(self) -> list[Any]:
        """The replies that have arrived, in order, reading the socket once (call it when the
        socket is readable, or it may wait up to the socket timeout). Error replies are in
        the list as exceptions."""
        replies: list[Any] = []
        try:
            if self._reader is None:
                conn = self.conn
                while conn.can_read(timeout=0):  # raises once the server closed it
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
            reader = self._reader
            reader.feed(self._recv())
            reply = reader.gets()
            while reply is not False:
                replies.append(_reply_error(str(reply)) if isinstance(reply, Exception) else reply)
                reply = reader.gets()
        except BaseException as exc:
            self._broken(exc)
        return replies

    def close(self) -> None:
        self._open = False
        self._sock = self._reader = None
        self.conn.disconnect()

    def _connect(self) -> None:
        if self._open:
            return
        conn = self.conn
        conn.connect()
        sock = getattr(conn, "_sock", None)
        # RESP3 connections can carry push messages between replies: redis-py sorts them out.
        resp2 = str(getattr(conn, "protocol", 2) or 2) == "2"
        if (
            _hiredis is not None
            and sock is not None
            and resp2
            and not isinstance(sock, ssl.SSLSocket)
        ):
            self._sock, self._reader = sock, _hiredis.Reader()
        self._open = True

    def _recv(self) -> bytes:
        data: bytes = self._sock.recv(65536)
        if not data:
            raise RedisConnectionError("Redis closed the connection")
        return data

    def _broken(self, exc: BaseException) -> NoReturn:
        """Anything that interrupts a request or its reply (a lost connection, a timeout, but
        also a task's soft time limit or a KeyboardInterrupt) leaves the stream at an unknown
        point: the connection is closed, so no later request can read an earlier one's reply."""
        self.close()
        if _hiredis is not None and isinstance(exc, _hiredis.ProtocolError):
            raise RedisConnectionError(f"unreadable reply from Redis: {exc}") from exc
        if isinstance(exc, RedisError) or not isinstance(exc, _UNAVAILABLE):
            raise exc
        # The socket's own errors, worded as redis-py words them.
        if isinstance(exc, TimeoutError):
            raise RedisTimeoutError("Timeout reading from Redis") from exc
        raise RedisConnectionError(f"Error talking to Redis: {exc}") from exc


def readable(fd: int) -> bool:
    """Whether ``fd`` has something to read now (never waits)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Redis's errors as the store's: StoreUnavailable when it does not answer, StoreError when
    it refuses (an ACL, a read-only replica, a key of another type)."""
    try:
        yield
    except _DOWN as exc:
        raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
    except _REFUSED as exc:
        if _cluster_unreachable(exc):
            raise StoreUnavailable(f"Redis did not answer: {exc}") from exc
        raise StoreError(f"Redis refused: {exc}") from exc


def _cluster_unreachable(exc: Exception) -> bool:
    """A cluster client that reaches no node, or finds slots without a master while it maps
    them (what it raises during a failover or a full outage): down, not refusing."""
    text = str(exc)
    return isinstance(exc, RedisClusterException) and (
        "cannot be connected" in text or "slots are not covered" in text
    )


def _reply_error(message: str) -> RedisError:
    """The redis-py exception for an error reply, for the codes this store acts on."""
    code = message.split(" ", 1)[0]
    if code == "NOSCRIPT":
        return NoScriptError(message)
    if code in ("LOADING", "MASTERDOWN", "TRYAGAIN"):
        return RedisConnectionError(message)  # the server is there but cannot answer yet
    return ResponseError(message)
