# SPDX-License-Identifier: MIT
"""Where verdicts meet Celery: the consumer bootstep, the deferral, and the pool-side fallback.

The bootstep wraps the consumer's ``on_task_request`` when the consumer is built, before the
task strategies capture it, so every request passes the gate at the moment it would go to the
pool: fresh, after a countdown, after Celery's own rate limit. A denied request never reaches a
pool process.

A deferral publishes the next copy first (same task id, same ``retries``, chains, chords, links,
expiry, time limits, priority and routing kept, through ``signature_from_request``), then records
its token as the live one, then acknowledges the old message. A crash at any point leaves either
the old copy live or the new one, never none; a stale twin is dropped when it arrives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from celery import Task as CeleryTask
from celery import bootsteps
from celery.exceptions import Ignore
from celery.worker.state import active_requests, task_ready
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from throttle import signals
from throttle.adaptive.sampler import LoadSampler
from throttle.adaptive.upstream import Feedback, UpstreamThrottled, feedback_from
from throttle.celeryext import headers as H
from throttle.celeryext.gate import Action, Call, Verdict
from throttle.celeryext.spec import options_of_class
from throttle.errors import StoreError, StoreUnavailable, ThrottleError
from throttle.store import Decision, RedisStore
from throttle.store.base import Guard, Prepared
from throttle.store.redis import readable

if TYPE_CHECKING:
    from throttle.celeryext.app import Throttle

__all__ = ["GateStep", "LoadStep", "install_pool_fallback"]

logger = logging.getLogger("throttle.gate")
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
#: Set on a request while its task body runs under throttle's __call__.
_RUNNING = "_throttle_running"


def extension(app: Any) -> Throttle:
    """The :class:`Throttle` installed on ``app``."""
    ext = getattr(app, "_throttle_extension", None)
    if ext is None:
        raise ThrottleError("throttle.Throttle(app) was not called for this Celery app")
    return ext  # type: ignore[no-any-return]


class GateStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: admission before the pool, and the worker heartbeat."""

    label = "throttle gate"

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.ext = extension(consumer.app)
        # A bad task option stops the worker here, with the error naming the task and option.
        for task in list(consumer.app.tasks.values()):
            self.ext.gate.spec_for(task)
        self._timer: Any = None
        original = consumer.on_task_request
        # With an event loop (prefork), admissions are pipelined: the loop goes on with other
        # messages while Redis answers. Without one (solo, threads), each waits for its answer.
        self.pipeline = _Pipeline(self.ext, consumer, original) if consumer.hub else None

        def on_task_request(request: Any) -> None:
            if self.pipeline is None or not self.pipeline.submit(request):
                apply_in_consumer(self.ext, consumer, request, original)

        consumer.on_task_request = on_task_request

    def start(self, consumer: Any) -> None:
        self._member = f"{consumer.hostname}:{os.getpid()}:{socket.gethostname()}"
        self._beat()
        self._timer = consumer.timer.call_repeatedly(
            self.ext.settings.heartbeat_interval, self._beat, priority=10
        )

    def stop(self, consumer: Any) -> None:
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                self.ext.flush_counts()
        except Exception:  # the counts are statistics: never in the way of a shutdown
            logger.warning("throttle: traffic counts not stored at shutdown", exc_info=True)
        finally:
            if self.pipeline is not None:
                self.pipeline.close()

    terminate = stop  # see LoadStep.terminate

    def _beat(self) -> None:
        """Count the live workers (for local fallback buckets), measure this host's clock
        against the store's, and notice Redis is back."""
        try:
            count = self.ext.heartbeat(self._member)
            self.ext.measure_offset()
        except ThrottleError as exc:
            logger.debug("throttle heartbeat failed: %s", exc)
            return
        self.ext.gate.live_workers = count
        self.ext.gate.store_answered()
        self.ext.flush_counts(background=True)


class EtaStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: a deferred copy is due at a moment on the store's clock (its
    ``throttle_eta`` header); this worker waits for it by its own clock, whatever the skew
    between its clock and the deferring worker's. Celery's own ``eta`` on the copy (the
    deferring worker's clock) is replaced on receipt, before Celery schedules the request."""

    label = "throttle eta"
    requires = ("celery.worker.consumer.tasks:Tasks",)  # the strategies exist by then

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.ext = extension(consumer.app)

    def start(self, consumer: Any) -> None:
        for name, strategy in list(consumer.strategies.items()):
            if not getattr(strategy, "_throttle_eta", False):
                consumer.strategies[name] = self._local_eta(strategy)

    def _local_eta(self, strategy: Callable[..., Any]) -> Callable[..., Any]:
        ext = self.ext

        def handle(message: Any, *args: Any, **kwargs: Any) -> Any:
            headers = getattr(message, "headers", None)
            offset = ext.store_offset
            if headers and offset is not None:
                stamp = headers.get(H.ETA)
                # [due, retries] from the deferral that published this very message (a retry
                # carries the header over with a higher count); anything but a plausible time
                # (a forged or mangled header) leaves Celery's eta.
                if isinstance(stamp, list | tuple) and len(stamp) == 2:
                    due, retries = stamp
                    if (
                        retries == (headers.get("retries") or 0)
                        and (type(due) is float or type(due) is int)
                        and 0 < due + offset < 1e11
                    ):
                        local = datetime.fromtimestamp(due + offset, tz=UTC)
                        headers["eta"] = local.isoformat()
            return strategy(message, *args, **kwargs)

        handle._throttle_eta = True  # type: ignore[attr-defined]
        return handle


class LoadStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: sample this host's load in a background thread and report it (see
    :mod:`throttle.adaptive.sampler`). Off when ``throttle_adaptive`` says ``enabled: False``."""

    label = "throttle load"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.ext = extension(worker.app)
        self.sampler: LoadSampler | None = None

    def include_if(self, worker: Any) -> bool:
        return bool(extension(worker.app).settings.adaptive.enabled)

    def start(self, worker: Any) -> None:
        adaptive = self.ext.settings.adaptive
        slots = max(1, int(getattr(worker, "concurrency", 1) or 1))
        self.sampler = LoadSampler(
            self.ext.store,
            f"{worker.hostname}:{os.getpid()}",
            adaptive.policy,
            interval=adaptive.interval,
            busy=lambda: len(active_requests) / slots,
            signals=adaptive.signals,
        )
        self.ext.sampler = self.sampler
        self.sampler.start()

    def stop(self, worker: Any) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None

    # A step without an ``obj`` is not stopped when the worker terminates (cold shutdown,
    # or the end of an in-process test worker): stop the thread then too.
    terminate = stop


def apply_in_consumer(ext: Throttle, consumer: Any, request: Any, run: Callable[[Any], Any]) -> Any:
    """Decide a request in the worker's main process and carry the verdict out."""
    task = request.task
    try:
        spec = ext.gate.spec_for(task)
    except ThrottleError as exc:
        # A task registered after the worker started, with a bad option: fail it clearly.
        _fail_request(request, Verdict(Action.FAIL, error=exc))
        task_ready(request)
        return None
    if spec is None:
        return run(request)  # not throttled: untouched
    try:
        verdict = ext.gate.check(
            task, request.id, tuple(request.args), dict(request.kwargs), request._request_dict
        )
    except Exception:
        # A bug of ours must not lose the task or hold it forever: let it run.
        logger.exception("throttle gate failed for task %s; running it unchecked", request.id)
        return run(request)
    return carry_out(ext, consumer, request, run, verdict)


def carry_out(
    ext: Throttle, consumer: Any, request: Any, run: Callable[[Any], Any], verdict: Verdict
) -> Any:
    """Run, defer, drop or fail a request as its verdict says."""
    if verdict.action is Action.RUN:
        admitted = verdict.headers.get(H.ADMITTED)
        if isinstance(admitted, dict):
            dispatcher = getattr(consumer, "event_dispatcher", None)
            if getattr(dispatcher, "enabled", False):
                admitted["events"] = 1  # the pool side sends its deferrals' events too
            # Signed: the pool side believes no admission header a message brought.
            retries = request._request_dict.get("retries")
            verdict.headers[H.ADMITTED] = H.seal_admitted(
                admitted, request.id, retries, ext.keyspace
            )
        request._request_dict.update(verdict.headers)
        return run(request)
    try:
        if verdict.action is Action.DEFER:
            _defer_request(ext, consumer, request, verdict)
        elif verdict.action is Action.DROP:
            logger.debug("task %s: dropped a stale copy of deferred work", request.id)
            request.acknowledge()
        else:
            _fail_request(request, verdict)
    finally:
        task_ready(request)
    return None


class _Waiting(NamedTuple):
    request: Any
    call: Call
    prepared: Prepared
    sent: float


class _Pipeline:
    """Admissions sent on a connection of their own without waiting for the answer; the
    worker's event loop hands each answer back when it arrives, in order.

    The check stays before the pool: a request waits here, reserved, until its verdict. What
    changes is that the worker's single-threaded main process does not sit idle for a round
    trip per task. Anything unusual (a cluster store, a script Redis lost, a reply that does not
    come within ``throttle_socket_timeout``) falls back to the same outcomes as the direct
    path: the scripts are reloaded, or the requests waiting follow ``on_store_error``.
    """

    def __init__(self, ext: Throttle, consumer: Any, run: Callable[[Any], Any]) -> None:
        self.ext = ext
        self.consumer = consumer
        self.run = run
        self.hub = consumer.hub
        self.pending: deque[_Waiting] = deque()
        self.link: Any = None
        self.fd: int | None = None
        self.encode: Callable[[Prepared], bytes] | None = None
        self.timer: Any = None

    def submit(self, request: Any) -> bool:
        """Start deciding ``request``; False when it must be decided the direct way."""
        gate = self.ext.gate
        task = request.task
        try:
            if gate.spec_for(task) is None:
                return False
            step = gate.begin(
                task, request.id, tuple(request.args), dict(request.kwargs), request._request_dict
            )
            if isinstance(step, Verdict):
                self._carry_out(request, step)
                return True
            prepared = gate.prepare(step)
        except Exception:
            # A cost no limit can take, a bad option, or a bug of ours: the direct path
            # decides again and handles it (fails the task, or runs it unchecked and logs).
            return False
        if prepared is None:
            return False
        try:
            if not self._connect():
                return False
            assert self.encode is not None
            self.link.send(self.encode(prepared))
        except _UNAVAILABLE as exc:
            self._fail_all(StoreUnavailable(str(exc)))
            self._carry_out(request, gate.conclude(step, StoreUnavailable(str(exc))))
            return True
        self.pending.append(_Waiting(request, step, prepared, time.monotonic()))
        if self.timer is None:
            self._arm(self.ext.settings.socket_timeout)
        return True

    def _connect(self) -> bool:
        if self.link is not None:
            return True
        store = self.ext.store()
        pipeline = store.pipeline() if isinstance(store, RedisStore) else None
        if pipeline is None:
            return False
        self.link, self.encode = pipeline
        # Remember the descriptor: after an error the socket object is dropped, and the loop
        # must forget this descriptor before a new socket can reuse its number.
        self.fd = self.link.fileno()
        self.hub.add_reader(self.fd, self._on_readable)
        return True

    def _on_readable(self, *_: Any) -> None:
        gate = self.ext.gate
        if not self.pending:
            # Readable with nothing asked: the server closed the connection. Drop it, or the
            # loop would call back here for ever.
            self._reset()
            return
        try:
            replies = self.link.ready()
        except _UNAVAILABLE as exc:
            self._fail_all(StoreUnavailable(str(exc)))
            return
        store = self.ext.store()
        for reply in replies:
            if not self.pending:  # a reply nobody asked for: the connection is not ours
                self._reset()
                return
            waiting = self.pending.popleft()
            if isinstance(reply, NoScriptError):
                # Redis lost the script (a restart, SCRIPT FLUSH): nothing ran; load it again
                # and decide this request the direct way.
                self._direct(waiting)
                continue
            try:
                if isinstance(reply, RedisConnectionError):  # LOADING, MASTERDOWN, TRYAGAIN
                    raise StoreUnavailable(str(reply))
                if isinstance(reply, RedisError):
                    raise StoreError(str(reply))
                outcome: Decision | Exception = store.finish(waiting.prepared, reply)
            except StoreError as exc:
                outcome = exc
            self._carry_out(waiting.request, gate.conclude(waiting.call, outcome))

    def _direct(self, waiting: _Waiting) -> None:
        store = self.ext.store()
        try:
            if isinstance(store, RedisStore):
                store.load_scripts()
            verdict = self.ext.gate.check(
                waiting.request.task,
                waiting.request.id,
                tuple(waiting.request.args),
                dict(waiting.request.kwargs),
                waiting.request._request_dict,
            )
        except ThrottleError as exc:
            verdict = self.ext.gate.conclude(waiting.call, exc)
        self._carry_out(waiting.request, verdict)

    def _arm(self, delay: float) -> None:
        self.timer = self.hub.call_later(max(delay, 0.001), self._expire)

    def _expire(self) -> None:
        """No answer within the socket timeout: the store is as good as down. The event loop
        fires its timers before it reads what has arrived, so after it was busy past the
        timeout (a task run in a solo pool, a long batch, a loaded host) answers that came
        meanwhile are read first: only what is still missing counts as unanswered."""
        self.timer = None
        if self.pending and self.fd is not None and readable(self.fd):
            self._on_readable()
            if self.timer is not None:
                return
        if not self.pending:
            return
        waited = time.monotonic() - self.pending[0].sent
        timeout = self.ext.settings.socket_timeout
        if waited >= timeout:
            self._fail_all(StoreUnavailable(f"no answer within {timeout:g} s"))
        else:
            self._arm(timeout - waited)

    def _fail_all(self, error: StoreUnavailable) -> None:
        waiting = list(self.pending)
        self._reset()
        for item in waiting:
            self._carry_out(item.request, self.ext.gate.conclude(item.call, error))

    def _reset(self) -> None:
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd is not None:
            with contextlib.suppress(Exception):
                self.hub.remove(self.fd)
            self.fd = None
        if self.link is not None:
            self.link.close()
            self.link = None

    def close(self) -> None:
        """The consumer stops: requests still waiting are left unacknowledged (the broker
        delivers them again)."""
        self._reset()

    def _carry_out(self, request: Any, verdict: Verdict) -> None:
        try:
            carry_out(self.ext, self.consumer, request, self.run, verdict)
        except Exception:
            # An event-loop callback must not raise: that would stop the worker.
            logger.exception("throttle could not carry out its verdict for task %s", request.id)


def _defer_request(ext: Throttle, consumer: Any, request: Any, verdict: Verdict) -> None:
    ctx = request._context
    headers = {**(ctx.headers or {}), **verdict.headers}
    try:
        _next_copy(
            ext, request.task, ctx, request.args, request.kwargs, headers, verdict
        ).apply_async()
    except Exception:
        # Nothing was published: give the message back to the broker rather than hold it.
        logger.exception("task %s: could not publish its deferred copy; requeued", request.id)
        request.reject(requeue=True)
        return
    try:
        record_guard(ext, verdict)
    except ThrottleError as exc:
        # The new copy is published and the denial recorded the hand-over to it, so it will be
        # admitted: it carries the work. Keeping the old copy too would leave two, and a store
        # that comes back empty (the hand-over lost) would then let both run.
        logger.warning(
            "task %s: could not record its deferral (%s); the new copy carries it", request.id, exc
        )
    request.acknowledge()
    _announce(ext, request.task, request.id, verdict, consumer.event_dispatcher)


def _fail_request(request: Any, verdict: Verdict) -> None:
    exc = verdict.error or ThrottleError("throttle refused the task")
    logger.error("task %s failed by throttle: %s", request.id, exc)
    request.task.backend.mark_as_failure(
        request.id, exc, request=request._context, store_result=request.store_errors
    )
    dispatcher = getattr(request, "_eventer", None)
    if dispatcher is not None and dispatcher.enabled:
        dispatcher.send("task-failed", uuid=request.id, exception=repr(exc), traceback="")
    request.acknowledge()


class _TaskEvents:
    """Sends a pool-side deferral's event through the task's ``send_event`` (a failure to
    publish it is logged, never raised: the deferral stands)."""

    enabled = True

    def __init__(self, task: Any) -> None:
        self.task = task

    def send(self, type_: str, uuid: str, **fields: Any) -> None:
        try:
            self.task.send_event(type_, retry=False, **fields)
        except Exception as exc:
            logger.debug("task %s: %s event not sent (%s)", uuid, type_, exc)


def _announce(ext: Throttle, task: Any, task_id: str, verdict: Verdict, dispatcher: Any) -> None:
    retry_after = verdict.decision.retry_after if verdict.decision else verdict.countdown
    logger.debug(
        "task %s deferred %.3f s by %s (key %s, %s, deferral %d)",
        task_id,
        verdict.countdown,
        verdict.bound_by,
        verdict.key,
        verdict.reason,
        verdict.deferrals,
    )
    fields = {
        "limit": verdict.bound_by,
        "key": verdict.key,
        "retry_after": retry_after,
        "countdown": verdict.countdown,
        "deferrals": verdict.deferrals,
        "reason": verdict.reason,
        "rebooked": verdict.rebooked,
    }
    if dispatcher is not None and getattr(dispatcher, "enabled", False):
        dispatcher.send("task-throttled", uuid=task_id, **fields)
    signals.task_throttled.send(sender=task, task_id=task_id, **fields)


# -- the pool side: eager mode, and workers without the gate ------------------------------------


def install_pool_fallback(cls: type) -> None:
    """Give a throttled task class a ``before_start`` that admits it where no gate did, and a
    ``__call__`` that turns the provider's "too many requests" into a deferral."""
    if cls.__dict__.get("_throttle_fallback", False):
        return
    previous = cls.before_start  # type: ignore[attr-defined]

    def before_start(
        self: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # Celery makes every message header a request attribute: neither of these may come
        # from a message (a usage report settled as if the task had made it; a marker that
        # would keep a 429 from deferring the task).
        setattr(self.request, H.USAGE, None)
        setattr(self.request, _RUNNING, False)
        _pool_check(self, task_id, args, kwargs)
        previous(self, task_id, args, kwargs)

    previous_call = cls.__call__
    own_call = previous_call is not CeleryTask.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or getattr(request, _RUNNING, False):
            # A plain function call, or the task calling itself inside its own run: no message
            # of its own to defer.
            return previous_call(self, *args, **kwargs)
        setattr(request, _RUNNING, True)
        try:
            while True:
                try:
                    if own_call:
                        return previous_call(self, *args, **kwargs)
                    # As Celery runs a task without a __call__ of its own: the worker has
                    # pushed the request already.
                    return self.run(*args, **kwargs)
                except Exception as exc:
                    feedback = feedback_from(exc)
                    if feedback is None or not _upstream_deferral(
                        self, exc, feedback, args, kwargs
                    ):
                        raise
                # Eager mode waited out the provider's delay: admit the task again, then run it.
                setattr(request, H.ADMITTED, None)
                _pool_check(self, request.id, args, kwargs)
        finally:
            setattr(request, _RUNNING, False)

    cls.before_start = before_start  # type: ignore[attr-defined]
    cls.__call__ = __call__  # type: ignore[method-assign]
    cls._throttle_fallback = True  # type: ignore[attr-defined]


def _upstream_deferral(
    task: Any, exc: Exception, feedback: Feedback, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """The provider throttled the task's call: record it and defer the task (raises Ignore once
    the next copy is published). In eager mode, wait here and return True to run it again.
    False lets the exception fail the task (not throttled, or deferred too often)."""
    ext = extension(task.app)
    req = task.request
    headers = throttle_headers(req)
    named = exc.limits if isinstance(exc, UpstreamThrottled) else ()
    verdict = ext.gate.upstream(task, req.id, tuple(args), dict(kwargs), headers, feedback, named)
    if verdict is None or verdict.action is not Action.DEFER:
        return False
    if req.is_eager:
        _announce(ext, task, req.id, verdict, None)
        ext.sleep(verdict.countdown)
        req.headers = {**(req.headers or {}), **verdict.headers}
        for name, value in verdict.headers.items():
            setattr(req, name, value)
        # No denial recorded a hand-over here (the copy was admitted): record the new token
        # as it is. Nothing else holds the work in eager mode.
        record_guard(ext, verdict, conditional=False)
        return True
    if verdict.guard is not None:
        # This copy was admitted, so no denial recorded the hand-over: record it now, before
        # the next copy exists. A crash from here on leaves two copies whose tokens the guard
        # names, and whichever comes first owns the work; the other is dropped as stale.
        current = headers.get(H.TOKEN) or "-"
        handover = Guard(req.id, f"{current}>{verdict.guard.token}")
        try:
            ext.store().set_guard(
                verdict.limits, verdict.identity, handover, ext.settings.guard_ttl
            )
        except ThrottleError as err:
            # Nothing is published yet: let the task fail with the provider's error.
            logger.warning("task %s: could not record its deferral (%s)", req.id, err)
            return False
    try:
        _republish(ext, task, args, kwargs, {**headers, **verdict.headers}, verdict)
    except ThrottleError as err:
        # The hand-over is recorded: the next copy owns the work when it arrives (and this
        # message is acknowledged), so the task is deferred all the same.
        logger.warning("task %s: could not record its deferral (%s)", req.id, err)
    # The pool process has none of the worker's event dispatcher: the task's own sends the
    # event, when the worker sends task events (the gate said so in the admission header).
    admitted = getattr(req, H.ADMITTED, None)
    events = isinstance(admitted, dict) and bool(admitted.get("events"))
    _announce(ext, task, req.id, verdict, _TaskEvents(task) if events else None)
    raise Ignore()


def _republish(
    ext: Throttle,
    task: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    headers: dict[str, Any],
    verdict: Verdict,
) -> None:
    """From the pool side: publish the running task's next copy, then record its guard."""
    _next_copy(ext, task, task.request, args, kwargs, headers, verdict).apply_async()
    record_guard(ext, verdict)


#: Headers a deferred task's next copy does not carry: ours that belong to one copy, and the
#: broker's dead-letter marks. RabbitMQ takes a message that carries them through a delay queue
#: it passed before for a dead-letter cycle and never delivers it (Celery's retries drop them
#: too).
_NOT_CARRIED: Final = frozenset(
    {
        *H.INTERNAL,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    }
)


def _next_copy(
    ext: Throttle,
    task: Any,
    ctx: Any,
    args: Any,
    kwargs: Any,
    headers: dict[str, Any],
    verdict: Verdict,
) -> Any:
    """The signature of a deferred task's next copy: same id, same retries, the canvas and
    routing of ``ctx`` (the request), ``headers`` less those of this copy only.

    RabbitMQ's native delayed delivery (quorum queues behind a topic exchange) routes whole
    seconds and cannot route less than one: there a shorter countdown is one second, so the
    copy comes back up to a second late (its booking waits), never early and never refused."""
    countdown = verdict.countdown
    if 0 < countdown < 1 and ext.native_delays:
        countdown = 1.0
    carried = {k: v for k, v in headers.items() if k not in _NOT_CARRIED}
    identity = carried.get(H.IDENTITY)
    if identity is not None and H.open_identity(identity, ctx.id, ext.keyspace)[0] is None:
        # Ignored on this copy (malformed, or signed for another task): not carried, so the
        # next copy is checked the same way, and publishing it cannot fail on sealing it.
        del carried[H.IDENTITY]
    if ext.store_offset is None:  # a pool process, forked before the worker measured it
        with contextlib.suppress(ThrottleError):
            ext.measure_offset()
    now = ext.store_time()
    if now is not None and countdown > 0:
        # When it is due on the store's clock: the worker that receives it may keep another
        # time than this one (see EtaStep). Celery's eta, from the countdown, is this one's.
        # Tied to the retry count, so a Celery retry of this copy (which carries its headers
        # over) keeps its own countdown.
        carried[H.ETA] = [round(now + countdown, 6), ctx.retries or 0]
    return task.signature_from_request(
        ctx,
        args=args,
        kwargs=kwargs,
        countdown=countdown,
        retries=ctx.retries or 0,
        headers=carried,
    )


def record_guard(ext: Throttle, verdict: Verdict, *, conditional: bool = True) -> None:
    """Record a deferral's next copy as the live one (after it is published): only if the
    hand-over its denial recorded still stands, unless not ``conditional``."""
    guard = verdict.guard
    if guard is not None and not conditional:
        guard = guard._replace(after=None)
    if guard is not None and not ext.store().set_guard(
        verdict.limits, verdict.identity, guard, ext.settings.guard_ttl
    ):
        logger.info(
            "task %s: another copy took the work over; the copy just published will be "
            "dropped as stale",
            guard.work_id,
        )


def throttle_headers(req: Any) -> dict[str, Any]:
    """The message headers of the request, with the throttle headers Celery moved onto it."""
    headers = {**(req.headers or {})}
    for name in (H.TOKEN, H.BOOKING, H.DEFERRALS, H.IDENTITY):
        value = getattr(req, name, None)
        if value is not None:
            headers[name] = value
    return headers


def task_base(base: type) -> type:
    """A subclass of an app's task base class whose throttled subclasses get the pool-side
    fallback as they are created (unthrottled ones are left exactly as they were)."""

    class ThrottleTask(base):  # type: ignore[misc]
        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            if options_of_class(cls) is not None:
                install_pool_fallback(cls)

    ThrottleTask.__qualname__ = ThrottleTask.__name__ = f"Throttle{base.__name__}"
    return ThrottleTask


def _pool_check(task: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    req = task.request
    ext = extension(task.app)
    admitted = getattr(req, H.ADMITTED, None)
    if admitted is not None:
        opened = H.open_admitted(admitted, task_id, req.retries, ext.keyspace)
        setattr(req, H.ADMITTED, opened)
        if opened is not None:
            return  # the gate let it through
        logger.debug("task %s: admission header ignored (not the gate's)", task_id)
    headers = throttle_headers(req)
    eager = bool(req.is_eager)
    # What the guard needs to know of this delivery (never carried to a next copy).
    info = req.delivery_info or {}
    again = info.get("redelivered") or getattr(req, "redelivered", None)  # RabbitMQ, or kombu
    delivery = {"retries": req.retries or 0, "redelivered": bool(again)}
    while True:
        verdict = ext.gate.check(task, task_id, tuple(args), dict(kwargs), {**headers, **delivery})
        if verdict.action is Action.RUN:
            setattr(req, H.ADMITTED, verdict.headers.get(H.ADMITTED, {}))
            return
        if verdict.action is Action.FAIL:
            raise verdict.error or ThrottleError("throttle refused the task")
        if verdict.action is Action.DROP:
            raise Ignore()
        _announce(ext, task, task_id, verdict, None)
        if not eager:
            # A worker without the gate: defer from here, as the gate would have.
            headers.update(verdict.headers)
            _republish(ext, task, args, kwargs, headers, verdict)
            raise Ignore()
        # Eager mode runs the task here and now: wait for the slot, then check again with the
        # booking and token the next copy would have carried.
        ext.sleep(verdict.countdown)
        headers.update(verdict.headers)
        record_guard(ext, verdict)
