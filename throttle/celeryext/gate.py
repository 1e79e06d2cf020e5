# SPDX-License-Identifier: MIT
"""The admission decision for one task message, independent of where it is applied.

:meth:`Gate.check` turns (task, id, args, kwargs, headers) into a :class:`Verdict`: run it now,
defer it by a countdown (with the headers its next copy carries), drop it (a stale twin of
deferred work), or fail it (it can never be admitted). The consumer bootstep applies verdicts
before a request takes a pool slot; the pool-side fallback applies them in eager mode and where
no gate runs. Nothing here blocks for long: the store client has a short socket timeout, and
while Redis does not answer a circuit breaker skips it for ``throttle_store_retry`` seconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from throttle import signals
from throttle._tokens import token_hex
from throttle.adaptive.upstream import Feedback
from throttle.celeryext import headers as H
from throttle.celeryext.counts import Tally, deferral_fields
from throttle.celeryext.settings import DEFAULT_TIER, LimitPolicy, ThrottleSettings
from throttle.celeryext.spec import TaskSpec, options_of, spec_from_options
from throttle.clock import Clock
from throttle.errors import (
    ConfigurationError,
    CostError,
    IdentityError,
    StoreError,
    StoreUnavailable,
    ThrottleError,
)
from throttle.identity import Bucket, Keyspace
from throttle.limits import Limit
from throttle.store import Decision, Guard, MemoryStore, Outcome, Receipt
from throttle.store.base import BaseStore, Charge, Prepared

__all__ = ["Action", "Call", "Gate", "ThrottleExhausted", "Verdict"]

logger = logging.getLogger("throttle.gate")
_US = 1_000_000


class ThrottleExhausted(ThrottleError):
    """A task was deferred ``throttle_max_deferrals`` times and is failed rather than deferred
    again. Carries the task id, the limit that bound last and the deferral count."""

    def __init__(self, task_id: str, limit: str | None = None, deferrals: int = 0) -> None:
        self.task_id = task_id
        self.limit = limit
        self.deferrals = deferrals
        super().__init__(task_id, limit, deferrals)

    def __str__(self) -> str:
        return (
            f"task {self.task_id} was deferred {self.deferrals} times by limit {self.limit!r} "
            "(throttle_max_deferrals)"
        )


#: Deferral reasons of the store's absence (see :meth:`Gate._fallback`).
_OUTAGE: Final = frozenset({"store-closed", "local"})


class Action(StrEnum):
    RUN = "run"
    DEFER = "defer"
    DROP = "drop"
    FAIL = "fail"


@dataclass
class Verdict:
    """What to do with one task message."""

    action: Action
    #: DEFER: seconds until the next copy is delivered.
    countdown: float = 0.0
    #: RUN: headers to add for the pool side. DEFER: the next copy's throttle headers.
    headers: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None
    error: BaseException | None = None
    #: DEFER: the guard to record once the next copy is published (None: record nothing).
    guard: Guard | None = None
    #: For events and logs: the limit that bound and the API key's fingerprint.
    bound_by: str | None = None
    key: str | None = None
    deferrals: int = 0
    #: DEFER: why ('booked', 'early', 'horizon', 'denied', 'store-closed', 'local').
    reason: str = ""
    #: DEFER: this copy held a booking, came back at or after its slot, and was denied again
    #: (another limit had filled meanwhile). Should be rare; an 'early' check-in is not one.
    rebooked: bool = False
    #: What the guard and settlement need: the enforced limits and the identity.
    limits: tuple[Limit, ...] = ()
    identity: dict[str, object] = field(default_factory=dict)


@dataclass
class Call:
    """One message being decided: who it is for, what it carries, what it is charged."""

    task_id: str
    identity: dict[str, object]
    tier: str
    key: str | None
    deferrals: int
    token: str | None
    booking: str | None
    policies: list[LimitPolicy]
    shadow: list[LimitPolicy] = field(default_factory=list)
    #: Each limit's cost as the task's options give it (enforced and shadow limits).
    costs: dict[str, float] = field(default_factory=dict)
    #: The enforced limits' costs.
    cost: dict[str, float] = field(default_factory=dict)
    #: The token the next copy carries if this one is deferred (recorded by the denial).
    next_token: str = field(default_factory=lambda: token_hex(8))
    #: This message's retry count, and whether the broker delivered it before (see Guard).
    retries: int = 0
    redelivered: bool = False

    @property
    def limits(self) -> tuple[Limit, ...]:
        return tuple(p.limit for p in self.policies)

    def verdict(self, action: Action, **fields: Any) -> Verdict:
        fields.setdefault("deferrals", self.deferrals)
        return Verdict(action, key=self.key, identity=self.identity, limits=self.limits, **fields)


class Gate:
    """Admission for throttled tasks of one Celery app (thread-safe)."""

    def __init__(
        self,
        settings: ThrottleSettings,
        store: Callable[[], BaseStore],
        keyspace: Keyspace,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._store = store
        self.keyspace = keyspace
        self.clock = clock
        self._specs: dict[str, TaskSpec | None] = {}
        self._lock = threading.Lock()
        self._down_until = 0
        self.live_workers = 1
        #: The store's clock as this process reads it (seconds), or None when it never
        #: measured its offset: the time of an in-process admission. Set by the extension.
        self.store_time: Callable[[], float | None] = lambda: None
        self._local = MemoryStore(keyspace, clock=clock)
        self._local_limits: dict[tuple[str, tuple[str, ...], int], Limit] = {}
        #: Per-key counts for ``celery throttle`` (None when ``throttle_counts_retention`` is 0).
        self.tally: Tally | None = Tally() if settings.counts_retention else None

    # -- task specs ---------------------------------------------------------------------------

    def spec_for(self, task: Any) -> TaskSpec | None:
        """The task's throttling, or None for a task that is not throttled (cached by name)."""
        name = task.name
        try:
            return self._specs[name]
        except KeyError:
            pass
        options = options_of(task)
        spec = None
        if options is not None:
            spec = spec_from_options(
                name, options, self.settings.tiers[DEFAULT_TIER], self.settings.dimensions
            )
        with self._lock:
            self._specs[name] = spec
        return spec

    def policies(self, spec: TaskSpec, tier: str) -> list[LimitPolicy]:
        if spec.inline is not None:
            return [spec.inline]
        return [self.settings.policy(name, tier) for name in spec.names]

    # -- identity ------------------------------------------------------------------------------

    def identity(
        self,
        spec: TaskSpec,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
    ) -> dict[str, object]:
        """The call's identity: a verified header identity, else the task's arguments; the tier
        from the identity, the resolver, or the default tier."""
        identity, how = H.open_identity(headers.get(H.IDENTITY), task_id, self.keyspace)
        if identity is None:
            if how not in ("absent",):
                logger.debug("task %s: identity header ignored (%s)", task_id, how)
            identity = spec.resolve_identity(args, kwargs)
        if "tier" not in identity:
            identity["tier"] = self.tier_of(identity)
        return identity

    def tier_of(self, identity: Mapping[str, object]) -> str:
        """The tier ``throttle_tier_resolver`` gives ``identity`` (the default without one)."""
        resolver = self.settings.tier_resolver
        if resolver is None:
            return DEFAULT_TIER
        try:
            tier = resolver(identity)
        except Exception:  # a user callable: never let it lose the task
            logger.exception("throttle_tier_resolver failed; using the default tier")
            return DEFAULT_TIER
        if tier is None:
            return DEFAULT_TIER
        if not isinstance(tier, str) or tier not in self.settings.tiers:
            logger.warning("throttle_tier_resolver returned unknown tier %r", tier)
            return DEFAULT_TIER
        return tier

    # -- the decision --------------------------------------------------------------------------

    def check(
        self,
        task: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
    ) -> Verdict:
        """Decide what happens to one message of ``task`` (one round trip to the store)."""
        step = self.begin(task, task_id, args, kwargs, headers)
        if isinstance(step, Verdict):
            return step
        try:
            outcome: Decision | Exception = self._admit(step)
        except (CostError, IdentityError, StoreError) as exc:
            outcome = exc
        return self.conclude(step, outcome)

    def begin(
        self,
        task: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
    ) -> Verdict | Call:
        """Everything before the store: a verdict when none is needed (not throttled, a cost
        that cannot be computed, the store known to be down), else the call to admit."""
        spec = self.spec_for(task)
        if spec is None:
            return Verdict(Action.RUN)
        try:
            call = self._call(spec, task_id, args, kwargs, headers)
        except ThrottleError as exc:  # an identity no fingerprint takes, or its callable failed
            return Verdict(Action.FAIL, error=exc)
        try:
            call.costs = spec.costs(args, kwargs)
        except Exception as exc:  # a user callable
            return call.verdict(Action.FAIL, error=_cost_failure(task.name, exc))
        if not call.policies:
            admitted = {H.ADMITTED: {"tier": call.tier}}
            return self._after(call, call.verdict(Action.RUN, headers=admitted))
        names = {p.name for p in call.policies}
        call.cost = {n: c for n, c in call.costs.items() if n in names}
        if self.clock.now_us() < self._down_until:
            return self._after(call, self._fallback(call))
        return call

    def _call(
        self,
        spec: TaskSpec,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
    ) -> Call:
        identity = self.identity(spec, task_id, args, kwargs, headers)
        tier = str(identity.get("tier", DEFAULT_TIER))
        policies = self.policies(spec, tier)
        api_key = identity.get("api_key")
        return Call(
            task_id=task_id,
            identity=identity,
            tier=tier,
            key=None if api_key is None else self.keyspace.fingerprint("api_key", api_key),
            deferrals=_int(headers.get(H.DEFERRALS)),
            token=_token(headers.get(H.TOKEN)),
            booking=_str(headers.get(H.BOOKING)),
            policies=[p for p in policies if p.mode == "enforce"],
            shadow=[p for p in policies if p.mode == "shadow"],
            retries=_int(headers.get("retries")),
            redelivered=_redelivered(headers),
        )

    def upstream(
        self,
        task: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
        feedback: Feedback,
        named: Sequence[str] = (),
    ) -> Verdict | None:
        """The provider throttled a call this task made: tell the store (the tenant's upstream
        factor falls, the limits ``named``, else the task's own, pause for the provider's delay,
        limits with an ``upstream`` kind follow what it says remains), and defer the task by
        that delay. None when the task is not throttled."""
        found = self._answered(task, task_id, args, kwargs, headers, feedback)
        if found is None:
            return None
        call, own, remaining = found
        chosen = [n for n in named if n in self.settings.limit_names] or list(own)
        for name in named:
            if name not in self.settings.limit_names:
                logger.warning("task %s: UpstreamThrottled names unknown limit %r", task_id, name)
        policies = {n: own.get(n) or self.settings.policy(n, call.tier) for n in chosen}
        for name in remaining:
            policies.setdefault(name, own[name])
        adaptive = self.settings.adaptive
        delay = feedback.delay
        wait = adaptive.upstream_delay if delay is None else delay
        try:
            self._store().upstream_throttled(
                [p.limit for p in policies.values()],
                call.identity,
                delay=wait,
                remaining=remaining,
                paused=chosen,
                quiet=adaptive.upstream_quiet,
                decrease=adaptive.upstream_decrease,
                floor=adaptive.upstream_floor,
                ttl=adaptive.upstream_ttl,
                adaptive=adaptive.enabled,
            )
        except ThrottleError as exc:
            logger.warning("task %s: upstream throttling not recorded: %s", task_id, exc)
        bound = chosen[0] if chosen else None
        verdict = self._defer(call, wait, "upstream", bound, None, call.next_token)
        if self.tally is not None and verdict.action is Action.DEFER:
            # Decided in a pool process, whose tally nobody flushes: straight to the store.
            counts = dict.fromkeys(deferral_fields(call.key, bound), 1.0)
            try:
                self._store().add_counts(counts, retention=self.settings.counts_retention)
            except ThrottleError as exc:
                logger.debug("task %s: deferral not counted: %s", task_id, exc)
        return verdict

    def follow(
        self,
        task: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
        feedback: Feedback,
    ) -> None:
        """The provider's answer to a call this task made said how much remains: each of the
        task's limits with an ``upstream`` kind it gives a count for follows it down."""
        found = self._answered(task, task_id, args, kwargs, headers, feedback)
        if found is None or not found[2]:
            return
        call, own, remaining = found
        adaptive = self.settings.adaptive
        try:
            self._store().upstream_ok(
                call.identity,
                successes=0,
                limits=[own[name].limit for name in remaining],
                remaining=remaining,
                ttl=adaptive.upstream_ttl,
                adaptive=adaptive.enabled,
            )
        except ThrottleError as exc:
            logger.warning("task %s: provider's remaining count not recorded: %s", task_id, exc)

    def _answered(
        self,
        task: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        headers: Mapping[str, Any],
        feedback: Feedback,
    ) -> tuple[Call, dict[str, LimitPolicy], dict[str, float]] | None:
        """For a provider's answer to a call of ``task``: the call, the task's own policies by
        name, and the remaining counts the answer gives for those with an ``upstream`` kind."""
        spec = self.spec_for(task)
        if spec is None:
            return None
        call = self._call(spec, task_id, args, kwargs, headers)
        own = {p.name: p for p in (*call.policies, *call.shadow)}
        said = feedback.remaining
        remaining = {
            name: said[p.upstream]
            for name, p in own.items()
            if p.upstream is not None and p.upstream in said
        }
        return call, own, remaining

    def conclude(self, call: Call, outcome: Decision | Exception) -> Verdict:
        """The verdict for a call, from the store's decision or the error it raised."""
        if isinstance(outcome, CostError | IdentityError):
            return call.verdict(Action.FAIL, error=outcome)
        if isinstance(outcome, StoreUnavailable):
            logger.warning("throttle store unavailable (%s); on_store_error applies", outcome)
            self._down_until = self.clock.now_us() + round(self.settings.store_retry * _US)
            return self._after(call, self._fallback(call))
        if isinstance(outcome, Exception):
            logger.error("throttle store error (%r); on_store_error applies", outcome)
            return self._after(call, self._fallback(call))
        return self._after(call, self._verdict(call, outcome))

    def _after(self, call: Call, verdict: Verdict) -> Verdict:
        ran = verdict.action is Action.RUN
        if self.tally is not None:
            if ran:
                costs = {p.name: call.costs.get(p.name, 1) for p in call.policies}
                costs.update((p.name, call.costs.get(p.name, 1)) for p in call.shadow)
                self.tally.admitted(call.key, costs, call.tier)
            elif verdict.action is Action.DEFER and verdict.reason not in _OUTAGE:
                # Deferrals while the store is away say nothing about the limits.
                self.tally.deferred(call.key, verdict.bound_by)
        if call.shadow and ran:
            # Counted once per run, not once per check of deferred work.
            self._shadow(call)
        return verdict

    def admission(self, call: Call) -> dict[str, Any]:
        """The store arguments of a call's admission."""
        return {
            "cost": call.cost,
            "reserve": True,
            "booking": call.booking,
            "horizon": self.settings.horizon,
            "guard": Guard(
                call.task_id,
                call.token,
                call.next_token,
                self.settings.guard_ttl,
                retries=call.retries,
                redelivered=call.redelivered,
                deferrals=call.deferrals,
            ),
            "adaptive": self.settings.adaptive.enabled,
        }

    def prepare(self, call: Call) -> Prepared | None:
        """The call's admission encoded for one script run, or None when it cannot be one
        (the store is a cluster and the limits span slots): then :meth:`check` it instead."""
        try:
            prepared = self._store().prepare(call.limits, call.identity, **self.admission(call))
        except IdentityError:
            if call.booking is None:
                raise
            logger.debug("task %s: booking header ignored (malformed)", call.task_id)
            call.booking = None
            return self.prepare(call)
        return prepared if isinstance(prepared, Prepared) else None

    def _admit(self, call: Call) -> Decision:
        try:
            return self._store().admit(call.limits, call.identity, **self.admission(call))
        except IdentityError:
            if call.booking is None:
                raise
            # A malformed booking header: checked as a fresh arrival, without it.
            logger.debug("task %s: booking header ignored (malformed)", call.task_id)
            call.booking = None
            return self._admit(call)

    def _verdict(self, call: Call, decision: Decision) -> Verdict:
        if decision.outcome is Outcome.STALE:
            return call.verdict(Action.DROP, decision=decision, reason="stale")
        if decision.allowed:
            assert decision.receipt is not None
            return call.verdict(
                Action.RUN,
                headers={H.ADMITTED: receipt_header(decision.receipt, call.tier, decision.at)},
                decision=decision,
            )
        # A booking made now or kept (early) travels with the next copy; a plain denial keeps
        # whatever booking this copy held; a slot beyond the horizon books nothing.
        booking = decision.booking
        if decision.outcome is Outcome.DENIED:
            booking = call.booking
        verdict = self._defer(
            call,
            decision.retry_after,
            decision.outcome.value,
            decision.bound_by,
            booking,
            call.next_token,
            decision,
        )
        verdict.rebooked = call.booking is not None and decision.outcome is not Outcome.EARLY
        return verdict

    def _defer(
        self,
        call: Call,
        wait: float,
        reason: str,
        bound_by: str | None,
        booking: str | None,
        token: str | None,
        decision: Decision | None = None,
    ) -> Verdict:
        """Defer by ``wait`` (capped at ``throttle_max_defer``), or fail the task once it has
        been deferred ``throttle_max_deferrals`` times. A new ``token`` is recorded as the live
        copy's after publishing; None keeps this copy's (nothing can be recorded)."""
        deferrals = call.deferrals + 1
        most = self.settings.max_deferrals
        if most is not None and deferrals > most:
            error = ThrottleExhausted(call.task_id, bound_by, call.deferrals)
            return call.verdict(Action.FAIL, error=error, decision=decision, bound_by=bound_by)
        carried = token if token is not None else call.token
        return call.verdict(
            Action.DEFER,
            countdown=min(max(wait, 0.0), self.settings.max_defer),
            headers={H.DEFERRALS: deferrals, H.BOOKING: booking, H.TOKEN: carried},
            decision=decision,
            # Recorded only if the hand-over this denial recorded still stands (see set_guard).
            guard=None
            if token is None
            else Guard(call.task_id, token, after=f"{call.token or '-'}>{token}"),
            bound_by=bound_by,
            reason=reason,
            deferrals=deferrals,
        )

    # -- while Redis does not answer -----------------------------------------------------------

    def _fallback(self, call: Call) -> Verdict:
        """``on_store_error``: closed limits defer the work, local ones use in-process buckets
        at the limit's share of this worker, open ones let it pass. The next copy keeps this
        copy's token and booking: no guard can be recorded while Redis is away."""
        closed = [p for p in call.policies if p.on_store_error == "closed"]
        if closed:
            return self._defer(
                call, self.settings.store_retry, "store-closed", closed[0].name, call.booking, None
            )
        local = [self._local_limit(p.limit) for p in call.policies if p.on_store_error == "local"]
        if local:
            # A scaled limit keeps its name, so the cost mapping applies as it is.
            names = {lim.name for lim in local}
            cost = {n: c for n, c in call.cost.items() if n in names}
            try:
                decision = self._local.admit(local, call.identity, cost=cost)
            except (CostError, IdentityError) as exc:
                return call.verdict(Action.FAIL, error=exc)
            if not decision.allowed:
                return self._defer(
                    call, decision.retry_after, "local", decision.bound_by, call.booking, None
                )
        admitted: dict[str, Any] = {"local": 1}
        at = self.store_time()
        if at is not None:  # the store's clock as this process reads it
            admitted["at"] = at
        return call.verdict(Action.RUN, headers={H.ADMITTED: admitted})

    def _local_limit(self, limit: Limit) -> Limit:
        """``limit`` at 1/live_workers of its rate and burst (never below its largest cost)."""
        workers = max(1, self.live_workers)
        if workers == 1:
            return limit
        cache_key = (limit.name, limit.wire, workers)  # wire: algorithm, period, count, burst
        scaled = self._local_limits.get(cache_key)
        if scaled is None:
            scaled = self._local_limits[cache_key] = limit.share(workers)
        return scaled

    def store_answered(self) -> None:
        """Close the circuit breaker: the shared buckets are in force again."""
        self._down_until = 0

    # -- shadow limits -------------------------------------------------------------------------

    def _shadow(self, call: Call) -> None:
        """Shadow limits are charged like real ones but never deny: their denials are logged
        and counted, so a team can see what a new limit would do before enforcing it."""
        if self.clock.now_us() < self._down_until:
            return
        limits = [p.limit for p in call.shadow]
        cost = {n: c for n, c in call.costs.items() if n in {lim.name for lim in limits}}
        try:
            decision = self._store().admit(
                limits, call.identity, cost=cost, adaptive=self.settings.adaptive.enabled
            )
        except ThrottleError as exc:
            logger.debug("shadow limits not evaluated for task %s: %s", call.task_id, exc)
            return
        if not decision.allowed:
            logger.info(
                "shadow limit %s would have deferred task %s by %.3f s",
                decision.bound_by,
                call.task_id,
                decision.retry_after,
            )
            if self.tally is not None and decision.bound_by is not None:
                self.tally.shadow_denied(call.key, decision.bound_by)
            signals.shadow_denied.send(
                sender=self,
                task_id=call.task_id,
                limit=decision.bound_by,
                retry_after=decision.retry_after,
            )

    # -- settlement ----------------------------------------------------------------------------

    def settle(self, spec: TaskSpec, admitted: object, usage: Mapping[str, float]) -> None:
        """Settle the estimate of an admission with the usage the task reported."""
        receipt = self.receipt_from_header(spec, admitted)
        if receipt is None:
            return
        usage = {n: v for n, v in usage.items() if n in {c.limit.name for c in receipt.charges}}
        if usage:
            self._store().settle(receipt, usage)

    def receipt_from_header(self, spec: TaskSpec, admitted: object) -> Receipt | None:
        if not isinstance(admitted, Mapping) or "nonce" not in admitted:
            return None
        tier = str(admitted.get("tier", DEFAULT_TIER))
        policies = {p.name: p for p in self.policies(spec, tier)}
        charges = []
        for name, tag, key, cost in admitted.get("charges", ()):
            policy = policies.get(name)
            if policy is None:
                return None
            charges.append(Charge(policy.limit, Bucket(tag, key), float(cost)))
        adaptive = bool(admitted.get("adaptive", False))
        return Receipt(tuple(charges), str(admitted["nonce"]), adaptive)


def receipt_header(receipt: Receipt, tier: str, at: float | None) -> dict[str, Any]:
    """A receipt as a JSON-able header, for settlement in the pool process, with the moment
    the store admitted the work (``at``: seconds on its clock)."""
    return {
        "tier": tier,
        "nonce": receipt.nonce,
        "charges": [[c.limit.name, c.bucket.tag, c.bucket.key, c.cost] for c in receipt.charges],
        "adaptive": receipt.adaptive,
        "at": at,
    }


def _cost_failure(task_name: str, exc: Exception) -> ThrottleError:
    if isinstance(exc, ThrottleError):
        return exc
    error = ConfigurationError(
        f"task {task_name!r} throttle_cost", f"the cost callable raised {exc!r}"
    )
    error.__cause__ = exc
    return error


def _redelivered(headers: Mapping[str, Any]) -> bool:
    """Whether the broker delivered this message before: RabbitMQ says so in its delivery
    info, kombu's Redis transport in a header it adds to the messages it restores."""
    info = headers.get("delivery_info")
    return bool(headers.get("redelivered")) or (
        isinstance(info, Mapping) and bool(info.get("redelivered"))
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _token(value: object) -> str | None:
    """A deferral token as this module writes them (16 hex digits); anything else is treated
    as no token, so a forged or mangled header cannot break the admission."""
    if isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
