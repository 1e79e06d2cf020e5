# SPDX-License-Identifier: MIT
"""``Throttle(app)``: reads the settings, installs the gate, and wires the signals.

::

    app = Celery("agents", broker="redis://127.0.0.1:6379/0")
    app.conf.update(throttle_key_secret="...", throttle_limits={...})
    throttle.Throttle(app)

Everything is checked here or when the app's tasks are registered: a bad setting or an unknown
limit in a task option raises :class:`~throttle.errors.ConfigurationError` naming it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import redis
from celery import Celery
from celery.app import utils as celery_utils
from celery.signals import before_task_publish, task_postrun
from celery.utils.saferepr import saferepr
from redis.cluster import RedisCluster

from throttle.adaptive.sampler import LoadSampler
from throttle.celeryext import control as _control  # noqa: F401  (registers the commands)
from throttle.celeryext import headers as H
from throttle.celeryext.gate import Gate
from throttle.celeryext.settings import ThrottleSettings, load_settings
from throttle.celeryext.worker import (
    EtaStep,
    GateStep,
    LoadStep,
    install_pool_fallback,
    task_base,
    throttle_headers,
)
from throttle.clock import Clock, SystemClock
from throttle.errors import ThrottleError
from throttle.identity import Keyspace
from throttle.store import RedisStore
from throttle.store.base import BaseStore

__all__ = ["Throttle"]

logger = logging.getLogger("throttle")


def _censor_in_celery_reports() -> None:
    """``celery report``, ``celery inspect conf`` and Flower's worker configuration show the
    app's settings, masking those whose names Celery's ``HIDDEN_SETTINGS`` pattern matches
    (``KEY``, ``SECRET``, ``PASS``...) and the broker and backend URLs, but not
    ``throttle_redis_url``, which may hold a password: add it to that pattern."""
    hidden = getattr(celery_utils, "HIDDEN_SETTINGS", None)
    if isinstance(hidden, re.Pattern) and not hidden.search("throttle_redis_url"):
        pattern = f"{hidden.pattern}|THROTTLE_REDIS_URL"
        celery_utils.HIDDEN_SETTINGS = re.compile(pattern, hidden.flags)


class Throttle:
    """The ``throttle`` extension of one Celery app.

    ``store`` replaces the Redis store (a :class:`~throttle.store.MemoryStore` for tests);
    ``clock`` and ``sleep`` replace the process clock and the wait used in eager mode.
    """

    def __init__(
        self,
        app: Celery,
        *,
        store: BaseStore | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.app = app
        self.settings: ThrottleSettings = load_settings(app.conf)
        _censor_in_celery_reports()
        self.keyspace = Keyspace(self.settings.key_secret, prefix=self.settings.key_prefix)
        self.clock = clock or SystemClock()
        self.sleep = sleep
        self._fixed_store = store
        self._store: BaseStore | None = None
        self._store_pid = 0
        self._lock = threading.Lock()
        self._flushing: threading.Thread | None = None
        self._live_counts: deque[tuple[int, int]] = deque()  # (when, live workers) per beat
        self._beats_since: int | None = None  # when beats last began to succeed
        self.gate = Gate(self.settings, self.store, self.keyspace, self.clock)
        self.gate.store_time = self.store_time
        app._throttle_extension = self
        app.steps["consumer"].add(GateStep)
        app.steps["consumer"].add(EtaStep)
        app.steps["worker"].add(LoadStep)
        #: This host's wall clock minus the store's, in seconds, as a worker last measured it
        #: (None until it has): deferred copies say when they are due on the store's clock.
        self.store_offset: float | None = None
        #: The running load sampler of this worker process (set by its bootstep).
        self.sampler: LoadSampler | None = None
        # Tasks created from now on get the pool-side fallback at once (eager mode may run a
        # task before the app is finalized); those with their own base class get it when the
        # app finalizes.
        if not getattr(app.Task, "_throttle_base", False):
            app.Task = task_base(app.Task)
            app.Task._throttle_base = True
        before_task_publish.connect(self._seal_identity, weak=False)
        self._wrap_send_task()
        task_postrun.connect(self._settle, weak=False)
        task_postrun.connect(self._close_guard, weak=False)
        task_postrun.connect(self._count_success, weak=False)
        #: Successes per tenant since the last report (this process): tag -> (identity, n).
        self._successes: dict[str, tuple[dict[str, object], int]] = {}
        self._successes_sent = self.clock.now_us()
        app.on_after_finalize.connect(self._register_tasks, weak=False)
        if app.finalized:
            self._register_tasks()

    def __repr__(self) -> str:
        return f"Throttle({self.app.main!r}, {self.settings!r})"

    @functools.cached_property
    def native_delays(self) -> bool:
        """Whether countdowns go through RabbitMQ's native delayed delivery (a quorum queue on
        an AMQP broker), which routes whole seconds."""
        try:  # Celery 5.5 and later
            from celery.utils.quorum_queues import detect_quorum_queues
        except ImportError:  # no native delayed delivery before it
            return False
        connection = self.app.connection_for_write()
        try:
            driver = connection.transport.driver_type
        finally:
            connection.release()
        return bool(detect_quorum_queues(self.app, driver)[0])

    # -- the store -----------------------------------------------------------------------------

    def store(self) -> BaseStore:
        """This process's store (a forked child builds its own connection)."""
        if self._fixed_store is not None:
            return self._fixed_store
        pid = os.getpid()
        if self._store is None or self._store_pid != pid:
            with self._lock:
                if self._store is None or self._store_pid != pid:
                    self._store = RedisStore(
                        self._client(), self.keyspace, booking_grace=self.settings.booking_grace
                    )
                    self._store_pid = pid
        return self._store

    def _client(self) -> redis.Redis | RedisCluster:
        timeout = self.settings.socket_timeout
        kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if self.settings.redis_cluster:
            return RedisCluster.from_url(self.settings.redis_url, **kwargs)
        return redis.Redis.from_url(self.settings.redis_url, **kwargs)

    def measure_offset(self) -> None:
        """Measure :attr:`store_offset` against the store's clock (Redis ``TIME``)."""
        store = self.store()
        if not isinstance(store, RedisStore):
            return
        before = time.time()
        server = store.server_time()
        after = time.time()
        self.store_offset = (before + after) / 2 - server

    def store_time(self) -> float | None:
        """The store's clock now, as this process reads it: its wall clock less the offset it
        measured (None if it never measured one)."""
        offset = self.store_offset
        return None if offset is None else round(time.time() - offset, 6)

    def heartbeat(self, member: str) -> int:
        """Record this worker as alive; return how many workers are (1 without Redis): the
        most counted by this process's beats of the last two windows (a window is three
        heartbeat intervals), and after the store did not answer, of the beats before too,
        until beats have succeeded for two windows again. A worker whose beat comes late once
        (its host was busy), or has not beaten yet into a store restarted empty, still
        counts: if the store went away just then, the in-process buckets of the others would
        each take a larger share, and together admit more than the limit."""
        store = self.store()
        if not isinstance(store, RedisStore):
            return 1
        window = self.settings.heartbeat_interval * 3
        now = self.clock.now_us()
        try:
            count = max(1, store.heartbeat(member, window))
        except ThrottleError:
            self._beats_since = None
            raise
        if self._beats_since is None:
            # The first beat since the store did not answer: until every worker has beaten
            # again (a store restarted empty counts only those that have), the counts from
            # before still stand.
            self._beats_since = now
        counts = self._live_counts
        counts.append((now, count))
        span = 2 * window * 1_000_000
        while counts[0][0] < now - span and now - self._beats_since >= span:
            counts.popleft()
        return max(c for _, c in counts)

    def flush_counts(self, *, background: bool = False) -> None:
        """Add this process's per-key counts to the store's tallies (see
        :mod:`throttle.celeryext.counts`). The gate step does it once per heartbeat in the
        ``background`` (a thread of its own, one at a time: the event loop never waits for
        it), and once more in the foreground when it stops."""
        tally = self.gate.tally
        if tally is None:
            return
        retention = self.settings.counts_retention
        store = self.store()  # before the lock: building the store takes it too
        if not background:
            tally.flush(store, retention)
            return
        with self._lock:
            if self._flushing is not None and self._flushing.is_alive():
                return  # the previous flush is still at it: these counts go with the next
            self._flushing = threading.Thread(
                target=tally.flush,
                args=(store, retention),
                name="throttle-counts",
                daemon=True,
            )
            self._flushing.start()

    # -- signal receivers ----------------------------------------------------------------------

    def _register_tasks(self, sender: Any = None, **_: Any) -> None:
        """Check every throttled task against the settings, and give it the pool fallback.

        Celery logs and swallows errors raised in its finalize signal, so a bad task option is
        raised again where it cannot be missed: when a worker starts (the gate step checks every
        task) and when the task is first decided.
        """
        if sender is not None and sender is not self.app:
            return
        for task in list(self.app.tasks.values()):
            if self.gate.spec_for(task) is not None:
                install_pool_fallback(type(task))

    def _seal_identity(
        self, sender: Any = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        """Replace a raw identity header by sealed fingerprints before the message leaves, for
        a message :meth:`_wrap_send_task` did not see (it seals them itself). The signal is
        every app's: only a task of this app's is sealed with this app's secret."""
        if not headers or not isinstance(sender, str) or sender not in self.app._tasks:
            return  # (the registry as it is: looking does not finalize the app)
        raw = headers.get(H.IDENTITY)
        task_id = headers.get("id")
        if isinstance(raw, Mapping) and isinstance(task_id, str):
            headers[H.IDENTITY] = H.seal_identity(raw, task_id, self.keyspace)

    def _wrap_send_task(self) -> None:
        """Every message of the app goes through ``app.send_task`` (``apply_async``, canvas,
        retries, our deferred copies, work sent by name). Celery builds the argument reprs
        there, and from them its events (``task-sent`` before any signal runs): give it reprs
        with fingerprints for a throttled task, unless the caller chose its own."""
        original = self.app.send_task
        ext = self

        def send_task(
            name: Any, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any
        ) -> Any:
            if options.get("argsrepr") is None or options.get("kwargsrepr") is None:
                for key, value in ext._reprs_for(name, args, kwargs, options).items():
                    if options.get(key) is None:
                        options[key] = value
            ext._seal_options(rest, options)
            return original(name, args, kwargs, *rest, **options)

        self.app.send_task = send_task

    def _seal_options(self, rest: tuple[Any, ...], options: dict[str, Any]) -> None:
        """Seal a raw identity header with this app's secret, bound to the task id (given, or
        chosen here, as Celery would); in place in ``options``."""
        headers = options.get("headers")
        if not isinstance(headers, Mapping) or len(rest) >= 3:  # the task id by position
            return
        raw = headers.get(H.IDENTITY)
        if not isinstance(raw, Mapping):
            return
        task_id = options.get("task_id") or str(uuid.uuid4())
        options["task_id"] = task_id
        options["headers"] = {
            **headers,
            H.IDENTITY: H.seal_identity(raw, str(task_id), self.keyspace),
        }

    def _reprs_for(
        self, name: object, args: Any, kwargs: Any, options: Mapping[str, Any]
    ) -> dict[str, str]:
        if not isinstance(name, str):
            return {}
        headers = options.get("headers")
        raw = headers.get(H.IDENTITY) if isinstance(headers, Mapping) else None
        try:
            task = self.app.tasks.get(name)  # (finalizes the app, as publishing does)
            return {} if task is None else self.shown_reprs(task, args, kwargs, raw)
        except Exception:  # never in the way of a publish: hide the arguments instead
            logger.warning("throttle: could not mask the arguments of %s; hidden", name)
            return {"argsrepr": "(...)", "kwargsrepr": "{...}"}

    def shown_reprs(
        self, task: Any, args: Any, kwargs: Any, raw_identity: object = None
    ) -> dict[str, str]:
        """``argsrepr`` and ``kwargsrepr`` for a message of ``task`` (what Celery's events and
        Flower show), where top-level arguments equal to its API key or agent id (taken from
        the arguments or from a raw ``throttle_identity`` header) read
        ``<api_key FINGERPRINT>``; empty when there is nothing to hide (or the task is not
        throttled). Values nested inside an argument are not looked into."""
        spec = self.gate.spec_for(task)
        if spec is None:
            return {}
        identity: dict[str, object] = {}
        if isinstance(raw_identity, Mapping):
            identity.update(raw_identity)
        # A user callable may raise: the gate reports it when the task is decided.
        with contextlib.suppress(Exception):
            identity.update(spec.resolve_identity(tuple(args or ()), dict(kwargs or {})))
        secret: dict[Any, str] = {}
        for dim, value in identity.items():
            if dim in ("api_key", "agent_id") and isinstance(value, str | bytes):
                secret[value] = f"<{dim} {self.keyspace.fingerprint(dim, value)}>"
        values = [*(args or ()), *(kwargs or {}).values()]
        if not any(isinstance(v, str | bytes) and v in secret for v in values):
            return {}

        def shown(value: Any) -> Any:
            return secret[value] if isinstance(value, str | bytes) and value in secret else value

        return {
            "argsrepr": self._repr([shown(a) for a in args or ()], True),
            "kwargsrepr": self._repr({k: shown(v) for k, v in (kwargs or {}).items()}, False),
        }

    def _repr(self, value: Any, positional: bool) -> str:
        """Celery's repr of arguments (its ``argsrepr``, or with ``positional`` false its
        ``kwargsrepr``)."""
        amqp = self.app.amqp
        size = amqp.argsrepr_maxsize if positional else amqp.kwargsrepr_maxsize
        return str(saferepr(value, size, maxlevels=self.app.conf.get("task_repr_maxlevels", 3)))

    def _count_success(
        self, sender: Any = None, task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        """A throttled task succeeded: count it for its tenant's upstream factor (additive
        increase), and report the counts at most once per ``throttle_load_interval``."""
        task = task or sender
        adaptive = self.settings.adaptive
        if state != "SUCCESS" or task is None or getattr(task, "app", None) is not self.app:
            return
        if not adaptive.enabled or getattr(task.request, H.ADMITTED, None) is None:
            return
        try:
            spec = self.gate.spec_for(task)
            if spec is None:
                return
            request = task.request
            identity = self.gate.identity(
                spec,
                request.id,
                tuple(request.args or ()),
                dict(request.kwargs or {}),
                throttle_headers(request),
            )
            tag = self.keyspace.tenant_tag(identity)
        except ThrottleError:
            return
        seen = self._successes.get(tag)
        self._successes[tag] = (identity, 1 if seen is None else seen[1] + 1)
        now = self.clock.now_us()
        if now - self._successes_sent < adaptive.interval * 1_000_000:
            return
        pending, self._successes = self._successes, {}
        self._successes_sent = now
        store = self.store()
        for who, count in pending.values():
            try:
                store.upstream_ok(
                    who,
                    successes=count,
                    step=adaptive.upstream_step,
                    quiet=adaptive.upstream_quiet,
                    ttl=adaptive.upstream_ttl,
                )
            except ThrottleError as exc:
                logger.debug("upstream successes not reported: %s", exc)
                return

    def _close_guard(
        self, sender: Any = None, task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        """After a deferred task succeeded: its guard says the work is done, so a copy of it
        that comes back (redelivered because its acknowledgement was lost) is dropped."""
        task = task or sender
        if state != "SUCCESS" or task is None or getattr(task, "app", None) is not self.app:
            return
        request = task.request
        token = getattr(request, H.TOKEN, None)
        admitted = getattr(request, H.ADMITTED, None)
        if not token or not isinstance(token, str) or not isinstance(admitted, dict):
            return  # never deferred (no guard), or not admitted through the shared store
        spec = self.gate.spec_for(task)
        receipt = None if spec is None else self.gate.receipt_from_header(spec, admitted)
        if receipt is None or not receipt.charges:
            return
        try:
            self.store().close_guard(receipt.charges, request.id, token, self.settings.guard_ttl)
        except (ThrottleError, ValueError) as exc:
            logger.debug("task %s: guard not closed: %s", request.id, exc)

    def _settle(self, sender: Any = None, task: Any = None, **_: Any) -> None:
        """After the task body: settle its estimate with the usage it reported."""
        task = task or sender
        if task is None or getattr(task, "app", None) is not self.app:
            return
        request = task.request
        usage = getattr(request, "throttle_usage", None)
        admitted = getattr(request, H.ADMITTED, None)
        if not usage or admitted is None:
            return
        spec = self.gate.spec_for(task)
        if spec is None:
            return
        try:
            self.gate.settle(spec, admitted, usage)
        except ThrottleError as exc:
            logger.warning("task %s: usage not settled: %s", request.id, exc)
