# SPDX-License-Identifier: MIT
"""What a store promises, the decision it returns, and the half of every store that does not
depend on where the state lives.

A store admits one unit of work against several limits at once, all or nothing, and settles a
cost estimate once the actual cost is known. :class:`BaseStore` validates the request, turns
limits and identity into bucket keys, encodes the arguments of ``lua/admit.lua`` and reads its
reply; subclasses only run the script (in Redis, or in :mod:`throttle.store._engine`).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from enum import StrEnum
from typing import Any, Final, NamedTuple

from throttle._tokens import token_urlsafe
from throttle.errors import ConfigurationError, CostError, StoreError
from throttle.identity import Bucket, Keyspace, KeyTemplate, total_key
from throttle.limits import MAX_SPAN, MAX_UNITS, MIN_FACTOR, Limit, check_cost, finite_number
from throttle.store._engine import fmt

__all__ = [
    "BaseStore",
    "Charge",
    "Decision",
    "Guard",
    "LimitState",
    "LoadFactor",
    "Outcome",
    "Packed",
    "Prepared",
    "Receipt",
    "Store",
    "short_reply",
]

_US = 1_000_000
_MINUTE_US = 60 * _US


class Outcome(StrEnum):
    """How an admission ended."""

    ADMITTED = "admitted"  #: every limit had room; all were charged
    REDEEMED = "redeemed"  #: admitted, and the booking presented paid for the limits it held
    DENIED = "denied"  #: some limit had no room; nothing was charged
    BOOKED = "booked"  #: denied, and the next free slot of the binding limit was booked
    EARLY = "early"  #: a booking was presented before its slot; nothing changed
    HORIZON = "horizon"  #: denied, and the free slot was beyond the horizon: nothing booked
    STALE = "stale"  #: this copy of the work is a stale twin (see :class:`Guard`); dropped


_ALLOWED = frozenset({Outcome.ADMITTED, Outcome.REDEEMED})
#: What a guard holds once a copy has done the work (no token is spelt so: tokens are hex or
#: base64url).
GUARD_DONE: Final = "~done"
_STALE = Outcome.STALE
_ADMITTED = Outcome.ADMITTED
_new = tuple.__new__  # a named tuple without its Python-level __new__, on the hot path
_PLANS = 4096  # admission plans remembered per store (each a few hundred bytes)
_SHAPES = 1024  # admission shapes (limits and costs) remembered per store
_PLAN_VALUE_LEN = 256  # identity values longer than this are not remembered
# The script's outcome as bytes (Redis) or str (engine), to the member.
_OUTCOMES: dict[object, Outcome] = {
    **{o.value: o for o in Outcome},
    **{o.value.encode(): o for o in Outcome},
}


class LimitState(NamedTuple):
    """One limit's bucket right after the decision."""

    name: str
    #: Units that could be admitted now. Negative while the bucket is in debt.
    remaining: float
    #: Seconds until the bucket is full again (0 when full).
    reset_after: float
    #: Seconds until this limit alone would admit the requested cost (0 when it does now).
    retry_after: float


class Guard(NamedTuple):
    """Which copy of a unit of work is the live one.

    Deferring work publishes a new copy before the old one is acknowledged, so a crash in
    between leaves two. Each copy carries a token (None for work never deferred). A denial with
    ``next`` records "from ``token`` to ``next``" for ``ttl`` seconds; after publishing the next
    copy the caller records ``next`` alone (:meth:`BaseStore.set_guard`) and then acknowledges
    the old copy. An admission whose token the store does not name is answered
    :attr:`Outcome.STALE`; while a deferral is half done, whichever copy comes first owns the
    work. So a crash anywhere leaves exactly one copy that runs.
    """

    work_id: str
    token: str | None
    next: str | None = None
    ttl: float = 3600.0
    #: For :meth:`BaseStore.set_guard`: the hand-over ("<old>><new>") a denial recorded; the
    #: token is then recorded only if no other copy took the work over meanwhile.
    after: str | None = None
    #: For an admission: this message's retry and deferral counts, and whether the broker
    #: redelivered it. The admission of a copy with a token records it as admitted with both
    #: counts; another message of that copy with the same counts is then STALE (the copy was
    #: published twice, by a broker that failed mid-publish), unless the broker redelivered it
    #: (its holder may have died before running it). A Celery retry of the copy, or the copy
    #: deferred again as it is (while the store did not answer: the admission may have run
    #: without its answer arriving), counts one more and is not.
    retries: int = 0
    redelivered: bool = False
    deferrals: int = 0


class LoadFactor(NamedTuple):
    """The cluster-wide load factor: the one in force (the override when there is one, else
    the computed one), the one the workers' reports give, and the operator's override."""

    in_force: float
    computed: float
    override: float | None


class Charge(NamedTuple):
    """One limit's part of an admission: the bucket and the units it is charged."""

    limit: Limit
    bucket: Bucket
    cost: float


class _Checked(NamedTuple):
    """A list of limits found valid, kept alive so that the ids it is remembered by stay its."""

    limits: tuple[Limit, ...]
    names: frozenset[str]
    dims: tuple[str, ...]  # every dimension any of them is keyed by


class _Shape(NamedTuple):
    """What an admission's limits and costs come to, whoever is admitted."""

    limits: tuple[Limit, ...]
    costs: tuple[float, ...]
    argv: tuple[str, ...]  # each limit's arguments (see _limit_args)
    argv_adaptive: tuple[str, ...]  # the same for an adaptive admission
    follows: str  # which factors its limits follow: "" none, "a" the load's, "k" also upstream
    windows: bool  # some limit is a sliding window (two keys)
    anchor: int  # which limit's hash tag the booking and guard keys share (see _anchor)
    wire: Any  # the store's own encoding of the two argv (see BaseStore._encode_args)
    #: Its buckets' keys for identities of plain strings, and their encoding for the store, as
    #: one template (see BaseStore._key_template), when it is remembered and has no windows.
    keys: KeyTemplate | None


class _Plan(NamedTuple):
    """What an admission's limits, identity and costs come to: the same every time they recur."""

    charges: tuple[Charge, ...]
    keys: tuple[str, ...]  # the buckets' keys (a sliding window has two)
    argv: tuple[str, ...]  # each limit's arguments (see _limit_args)
    argv_adaptive: tuple[str, ...]  # the same for an adaptive admission
    anchor: str  # the hash tag of the booking and guard keys
    follows: str  # which factors its limits follow: "" none, "a" the load's, "k" also upstream
    wire: Any  # the store's own encoding of keys and argv (see BaseStore._encode_keys)
    #: For a plan remembered (for the admissions that recur): its plain admissions, packed
    #: (see _Template), by (peek, adaptive, reserve, horizon); None for a plan not remembered.
    sent: dict[tuple[bool, bool, bool, float | None], _Template] | None


class _Template(NamedTuple):
    """A plan's plain admission (no booking, guard or test clock) as sent, but for its nonce:
    ``keys`` is shared by every call made from it (never to be changed), ``argv`` is copied
    for each with its own nonce (``argv[4]``), and the frame is ``before`` + the nonce +
    ``after``. An admission that books when denied (``reserve``) has a new booking id for a
    nonce and a booking key named by it, the last key: then ``keys`` lacks it, and the frame
    is ``before`` + the booking key + ``mid`` + the nonce + ``after``."""

    keys: list[str]
    argv: list[str]
    before: bytes
    after: bytes
    mid: bytes = b""


class _Parts(NamedTuple):
    """A plain admission of one shape, packed around its plan's keys and its nonce (see
    :meth:`BaseStore._encode_call`), and its argv, the nonce left blank."""

    start: bytes
    mid: bytes
    after: bytes
    argv: list[str]


class Prepared(NamedTuple):
    """One admission encoded for the admission script (see :meth:`BaseStore.prepare`)."""

    charges: tuple[Charge, ...]
    keys: list[str]
    argv: list[str]
    booking: str | None
    nonce: str
    #: The whole script call as the store sends it, when the store encodes it ahead.
    frame: bytes | None = None


class Packed(NamedTuple):
    """A plain admission (or peek) packed whole but for its nonce, made by
    :meth:`BaseStore.pack`; :meth:`BaseStore.fill` makes each admission of it."""

    charges: tuple[Charge, ...]
    anchor: str  # the hash tag of its booking and guard keys (as _Plan's)
    keys: list[str]  # shared by every admission of it: never to be changed
    #: Copied for each admission, which puts its own nonce in argv[4] (this one holds the
    #: nonce of the admission it was packed with).
    argv: list[str]
    before: bytes  # the frame is ``before`` + ``mid`` + the nonce + ``after``
    mid: bytes
    after: bytes


class Receipt(NamedTuple):
    """Proof of an admission, for :meth:`Store.settle`. Settle each receipt at most once."""

    charges: tuple[Charge, ...]
    nonce: str
    #: The admission applied the adaptive factors: settlement does too.
    adaptive: bool = False


class Decision(NamedTuple):
    """The answer to one admission (immutable: a named tuple, built on every admission).

    ``retry_after`` is in seconds, exact (not rounded): when denied, the earliest moment the
    same request could pass if nothing else happens; when booked, the wait until the booked
    slot. ``bound_by`` names the limit that decided it (None when admitted). ``booking`` is the
    id to present on return (when booked or early). ``receipt`` is set when admitted. ``at`` is
    when the store decided, in seconds on its clock (a Redis server's: since the epoch; an
    in-process store's: its clock's), None for a stale copy.
    """

    outcome: Outcome
    retry_after: float
    bound_by: str | None
    limits: tuple[LimitState, ...]
    booking: str | None = None
    receipt: Receipt | None = None
    at: float | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome in _ALLOWED

    def __bool__(self) -> bool:
        return self.outcome in _ALLOWED


class Store(ABC):
    """The interface every store offers (see :class:`BaseStore` for the shared behaviour)."""

    keyspace: Keyspace

    @abstractmethod
    def admit(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        reserve: bool = False,
        booking: str | None = None,
        horizon: float | None = None,
        guard: Guard | None = None,
        adaptive: bool = False,
        now_us: int | None = None,
    ) -> Decision: ...

    @abstractmethod
    def settle(
        self, receipt: Receipt, usage: Mapping[str, float], *, now_us: int | None = None
    ) -> None: ...


class _Nonces:
    """Cheap unique nonces for log members: a random per-process prefix and a counter, in
    hex. The prefix is renewed in a forked child, which would otherwise repeat its parent's.
    ``next()`` gives the next one, with no Python frame: read ``next`` at each call, as a
    fork replaces it."""

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        prefix = secrets.token_urlsafe(6)  # (letters, digits, - and _: no braces to format)
        self.next: Callable[[], str] = map(f"{prefix}{{:x}}".format, itertools.count()).__next__


class BaseStore(Store):
    """Validation, key layout and the wire format shared by every store.

    ``booking_grace`` is how long (seconds) after its slot a booking still redeems: work that
    comes back later is checked as a fresh arrival (the script checks the slot's age on the
    store's clock), and the lapsed booking has cost its limit one slot. So copies that come
    back late together pass a limit by at most its rate x ``booking_grace`` in a window.
    """

    def __init__(self, keyspace: Keyspace, *, booking_grace: float = 600.0) -> None:
        if not isinstance(keyspace, Keyspace):
            raise ConfigurationError("keyspace", f"must be a Keyspace, got {keyspace!r}")
        self.keyspace = keyspace
        self._grace = str(round(_seconds(booking_grace, "booking_grace") * _US))
        self._nonces = _Nonces()
        self._checked: dict[tuple[int, ...], _Checked] = {}
        self._plans: dict[Hashable, _Plan] = {}
        self._sent = 0  # packed admissions the remembered plans hold, in all
        self._shapes: dict[Hashable, _Shape] = {}
        #: (a shape's argv, peek, adaptive, reserve, horizon) -> the parts of a plain
        #: admission of that shape, for plans not remembered (see _assemble).
        self._parts: dict[tuple[Any, ...], _Parts] = {}
        #: the ids of a list of limits -> the limits (kept alive) and their keys' template.
        self._key_templates: dict[
            tuple[int, ...], tuple[tuple[Limit, ...], KeyTemplate | None]
        ] = {}
        self._plan_hits = 0  # since the plans were last cleared
        self._plan_pause = 0  # admissions left before plans are remembered again

    # -- subclasses run the scripts ----------------------------------------------------------

    @abstractmethod
    def _run_admit(self, keys: list[str], argv: list[str]) -> Sequence[Any]: ...

    @abstractmethod
    def _run_settle(self, keys: list[str], argv: list[str]) -> object: ...

    @abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def _run_load(self, keys: list[str], argv: list[str]) -> Sequence[Any]: ...

    @abstractmethod
    def _run_upstream(self, keys: list[str], argv: list[str]) -> object: ...

    @abstractmethod
    def _run_sample(self, keys: list[str], argv: list[str]) -> Sequence[Any]: ...

    @abstractmethod
    def _set_text(self, key: str, value: str, ttl: float) -> None: ...

    @abstractmethod
    def _set_guard(self, key: str, token: str, after: str, ttl: float) -> bool:
        """``lua/guard.lua``: record ``token`` unless the key names a copy other than the
        hand-over ``after`` (empty: whatever the key holds)."""

    #: True for a store whose keys live in several shards (Redis Cluster slots), where each
    #: admission runs once per slot it touches.
    sharded = False

    def _slot(self, tag: str) -> Hashable:
        """Which calls may share one script run: all of them, unless the store is sharded."""
        return None

    # -- admission ----------------------------------------------------------------------------

    def charges(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        cost: float | Mapping[str, float] = 1,
    ) -> tuple[Charge, ...]:
        """Validate an admission request and resolve it to buckets."""
        if isinstance(limits, Limit):
            limits = (limits,)
        names = self._check(limits).names
        if not isinstance(identity, Mapping):
            raise ConfigurationError("identity", f"must be a mapping, got {identity!r}")
        if isinstance(cost, Mapping):
            unknown = set(cost) - names
            if unknown:
                raise ConfigurationError(
                    "cost", f"names limits not in this admission: {sorted(unknown)}"
                )
            costs = [check_cost(lim, cost.get(lim.name, 1)) for lim in limits]
        else:
            costs = [check_cost(lim, cost) for lim in limits]
        bucket = self.keyspace.bucket
        return tuple(
            Charge(lim, bucket(lim, identity), c) for lim, c in zip(limits, costs, strict=True)
        )

    def _check(self, limits: Sequence[Limit]) -> _Checked:
        """A valid list of limits, described. A list checked once is remembered by the identity
        of its limits (which the cache keeps alive), so the hot path skips the checks."""
        key = tuple(map(id, limits))
        known = self._checked.get(key)
        if known is not None:
            return known
        if not limits:
            raise ConfigurationError("limits", "at least one limit is needed")
        names: set[str] = set()
        for limit in limits:
            if not isinstance(limit, Limit):
                raise ConfigurationError("limits", f"expected Limit objects, got {limit!r}")
            if limit.name in names:
                raise ConfigurationError("limits", f"limit {limit.name!r} is listed twice")
            names.add(limit.name)
        if len(self._checked) >= 1024:  # limit lists are configuration: a few at most
            self._checked.clear()
        dims = tuple(dict.fromkeys(d for limit in limits for d in limit.per))
        checked = self._checked[key] = _Checked(tuple(limits), frozenset(names), dims)
        return checked

    def _plan(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        cost: float | Mapping[str, float],
        plain: tuple[bool, bool, bool, float | None] | None = None,
    ) -> _Plan | Prepared:
        """The charges of an admission and the script arguments that do not change from one
        call to the next. Recent plans are remembered, keyed by the limits' identity and the
        identity's and costs' values, when every value is of a type whose equality is safe to
        key on (a str or None; an int or float cost): ``1`` and ``True`` are equal as dict keys
        but not as costs, and a ``Fingerprint`` equals the string it is spelt as.

        ``plain`` is given for a plain admission (see :meth:`_prepare`), as (peek, adaptive,
        reserve, horizon): a plan that is not remembered and fills in its shape's key template
        is then not made at all, and the admission comes back :class:`Prepared` instead."""
        memo = None
        # (> 0: threads that count it down at once can take it below 0, which must not read as
        # paused for ever.)
        if self._plan_pause > 0:
            self._plan_pause -= 1
        else:
            memo = self._plan_key(limits, identity, cost)
            if memo is not None:
                plan = self._plans.get(memo)
                if plan is not None:
                    self._plan_hits += 1
                    return plan
        shape = self._shape(limits, identity, cost)
        template = shape.keys
        fps = (
            None if template is None else self.keyspace.plain_fingerprints(template.dims, identity)
        )
        if template is not None and fps is not None:
            # Filled in from the template of its limits' keys: a plan costs about a tenth less
            # so than by laying out each key and packing the lot (many tenants: every call).
            parts = template.fill(fps)
            n = 2 * template.nlimits
            if len(parts) > n:
                if memo is None and plain is not None and not (plain[1] and shape.follows):
                    return self._fresh(shape, parts, n, *plain)
                wire = self._with_keys(shape.wire, parts[n], template.nlimits)
            else:
                wire = None
            buckets, charges = _filled(shape, parts, n)
            keys = parts[1:n:2]
        else:
            buckets = self.keyspace.buckets(shape.limits, identity)
            if shape.windows:
                keys = []
                for limit, b in zip(shape.limits, buckets, strict=True):
                    keys.append(b.key)
                    if limit.algorithm == "sliding_window":
                        keys.append(total_key(b))
            else:
                keys = [b.key for b in buckets]
            wire = self._encode_keys(keys, shape.wire)
            charges = tuple(
                [_new(Charge, c) for c in zip(shape.limits, buckets, shape.costs, strict=True)]
            )
        plan = _new(
            _Plan,
            (
                charges,
                tuple(keys),
                shape.argv,
                shape.argv_adaptive,
                buckets[shape.anchor].tag,
                shape.follows,
                wire,
                None if memo is None else {},
            ),
        )
        if memo is not None:
            if len(self._plans) >= _PLANS:
                # Full. Few hits since the last time means the admissions seldom recur (many
                # identities, or costs that vary per call): stop remembering for a while.
                if self._plan_hits < _PLANS:
                    self._plan_pause = 16 * _PLANS
                self._plans.clear()
                self._plan_hits = self._sent = 0
            self._plans[memo] = plan
        return plan

    def _shape(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        cost: float | Mapping[str, float],
    ) -> _Shape:
        """What ``limits`` and ``cost`` come to whoever is admitted, validated (``identity``
        too). Remembered by the limits' identity and the costs' values, when those are plain
        ints and floats: admissions whose identities seldom recur still skip the checks."""
        ids = tuple(map(id, limits))
        memo: Hashable | None = None
        if type(cost) is int or type(cost) is float:
            memo = (ids, cost)
        elif type(cost) is dict:
            memo = _cost_key(ids, cost)
        shape = None if memo is None else self._shapes.get(memo)
        if shape is not None:
            # (A dict is the usual identity, and an ABC's isinstance costs more than a lookup.)
            if type(identity) is not dict and not isinstance(identity, Mapping):
                raise ConfigurationError("identity", f"must be a mapping, got {identity!r}")
            return shape
        charges = self.charges(limits, identity, cost)
        argv = _limit_args(charges, False)[1]
        follows = _follows(charges)
        argv_adaptive = _limit_args(charges, True)[1] if follows else argv
        windows = any(c.limit.algorithm == "sliding_window" for c in charges)
        wire = self._encode_args(argv, argv_adaptive)
        shape = _Shape(
            tuple(c.limit for c in charges),
            tuple(c.cost for c in charges),
            tuple(argv),
            tuple(argv_adaptive),
            follows,
            windows,
            next((i for i, c in enumerate(charges) if not c.limit.is_global), 0),
            wire,
            None if memo is None or windows else self._key_template(ids, wire),
        )
        if memo is not None:
            if len(self._shapes) >= _SHAPES:  # limits and costs are configuration, mostly
                self._shapes.clear()
            self._shapes[memo] = shape
        return shape

    def _plan_key(
        self, limits: Sequence[Limit], identity: Mapping[str, object], cost: object
    ) -> Hashable | None:
        if type(identity) is not dict:
            return None
        ids = tuple(map(id, limits))
        checked = self._checked.get(ids)
        if checked is None:  # not validated yet: the slow path does it
            return None
        values = tuple(map(identity.get, checked.dims))
        for v in values:
            if v is not None and (type(v) is not str or len(v) > _PLAN_VALUE_LEN):
                return None
        if type(cost) is int or type(cost) is float:
            return (ids, values, cost)
        if type(cost) is not dict:
            return None
        costs = _cost_key(ids, cost)
        return None if costs is None else (costs, values)

    def admit(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        reserve: bool = False,
        booking: str | None = None,
        horizon: float | None = None,
        guard: Guard | None = None,
        adaptive: bool = False,
        now_us: int | None = None,
    ) -> Decision:
        """Admit one unit of work against every limit in ``limits``, all or nothing.

        ``cost`` is one number for every limit or a mapping from limit name to cost (default 1).
        With ``reserve``, a denial books the binding limit's next free slot and the decision
        carries the booking id; present it as ``booking`` when the work comes back at or after
        ``retry_after`` and the booked limit admits it without charging again (other limits are
        checked then). A slot further than ``horizon`` seconds is not booked. With ``guard``, a
        copy of the work whose token is not the live one is answered :attr:`Outcome.STALE` and
        nothing changes. With ``adaptive``, every limit that is ``adaptive`` refills at its rate
        times the factors in force: the cluster-wide load factor (see :meth:`set_load_factor`),
        and for a limit keyed by ``api_key`` its tenant's upstream factor. ``now_us`` replaces
        the store's clock (tests only).
        """
        prepared = self._prepare(
            limits, identity, cost, reserve, booking, horizon, guard, adaptive, now_us
        )
        if isinstance(prepared, Prepared):
            return self.finish(prepared, self._run_prepared(prepared))
        groups, head, booking_id, nonce, work_id = prepared
        return self._admit_sharded(groups, head, booking_id, nonce, now_us, work_id, adaptive)

    def peek(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
        now_us: int | None = None,
    ) -> Decision:
        """What :meth:`admit` would answer now for ``cost``, charging nothing and booking
        nothing: ``allowed``, the wait until the cost would pass (``retry_after``, the limit
        that binds) and every limit's state. For operators' tools; it is one script run per
        slot, like an admission. Unlike an admission it evaluates every slot, also after one
        denied."""
        if isinstance(limits, Limit):
            limits = (limits,)
        if not self.sharded:
            prepared = self._prepare(
                limits, identity, cost, False, None, None, None, adaptive, now_us, True
            )
            assert isinstance(prepared, Prepared)
            return self.finish_peek(prepared, self._run_prepared(prepared))
        plan = self._plan(limits, identity, cost)
        head = [
            "" if now_us is None else str(int(now_us)),
            "p",
            "",
            "",
            self._nonces.next(),
            self._grace,
            "",
        ]
        groups = self._group(plan.charges)
        states: list[LimitState] = []
        bound: str | None = None
        retry = 0.0
        at = None
        for group in groups:
            reply = self._run_admit(*self._admit_args(group, head, None, None, adaptive))
            decision = self._decision(group, reply, None, head[4], adaptive)
            states += decision.limits
            at = decision.at
            if not decision.allowed and (bound is None or decision.retry_after > retry):
                bound, retry = decision.bound_by, decision.retry_after
        order = {lim.name: i for i, lim in enumerate(limits)}
        states.sort(key=lambda state: order[state.name])
        outcome = Outcome.ADMITTED if bound is None else Outcome.DENIED
        return Decision(outcome, retry, bound, tuple(states), None, None, at)

    def prepare(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        reserve: bool = False,
        booking: str | None = None,
        horizon: float | None = None,
        guard: Guard | None = None,
        adaptive: bool = False,
        now_us: int | None = None,
        peek: bool = False,
    ) -> Prepared | tuple[Any, ...]:
        """Validate an admission and encode its one script run, without running it: for callers
        that send the run themselves (pipelined on a connection of their own) and then pass the
        reply to :meth:`finish`. An admission that spans several shards cannot be one run: it
        comes back as a tuple that only :meth:`admit` understands. With ``peek`` the run is
        :meth:`peek`'s (charge nothing, book nothing; ``reserve``, ``booking`` and ``guard``
        must be left out); pass its reply to :meth:`finish_peek`."""
        if peek and (reserve or booking is not None or guard is not None):
            raise ConfigurationError("peek", "a peek neither books, redeems nor guards")
        return self._prepare(
            limits, identity, cost, reserve, booking, horizon, guard, adaptive, now_us, peek
        )

    def pack(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        cost: float | Mapping[str, float] = 1,
        adaptive: bool = False,
        peek: bool = False,
    ) -> Packed | None:
        """A plain admission (a peek with ``peek``) of ``limits`` for ``identity``, packed whole
        but for its nonce, for a caller that admits the same identity again and again and keeps
        it: each :meth:`fill` of it is then what :meth:`prepare` would give, for a fraction of
        the work. Only a lookup: it is found once :meth:`prepare` (or :meth:`admit`) has
        remembered this admission's plan and packed it, from the second admission of an
        identity on; nothing is validated here, as only what was validated is found. None
        otherwise, and for an identity whose values are not all strings of at most 256
        characters, while too many identities recur too seldom for plans to be remembered, in
        a sharded store, and in a store that sends no packed frames
        (:class:`~throttle.store.MemoryStore`): :meth:`prepare` then."""
        if self._plan_pause > 0:
            return None
        memo = self._plan_key(limits, identity, cost)
        plan = None if memo is None else self._plans.get(memo)
        if plan is None or not plan.sent:
            return None
        t = plan.sent.get((peek, adaptive, False, None))
        if t is None:
            return None
        self._plan_hits += 1  # (the plan was used again, as by a prepare())
        return Packed(plan.charges, plan.anchor, t.keys, t.argv, t.before, t.mid, t.after)

    def fill(self, packed: Packed) -> Prepared:
        """An admission of ``packed`` (see :meth:`pack`) with a nonce of its own, to send as
        :meth:`prepare`'s."""
        return self._fill(*packed)

    def _prepare(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        cost: float | Mapping[str, float],
        reserve: bool,
        booking: str | None,
        horizon: float | None,
        guard: Guard | None,
        adaptive: bool,
        now_us: int | None,
        peek: bool = False,
    ) -> Prepared | tuple[Any, ...]:
        if isinstance(limits, Limit):
            limits = (limits,)
        if horizon is not None and type(horizon) is not float and type(horizon) is not int:
            # (Plain numbers are checked where a packed admission is made for them: the rest
            # before they key one, where a list could not, and True would pass for 1.)
            _check_horizon(horizon)
        # A plain admission or peek (no booking to redeem, guard or test clock; a horizon only
        # when it may book) of a plan sent whole: everything but the nonce (and the booking
        # that may be made, named by it) is the same from call to call, and is kept packed.
        mode = (
            (peek, adaptive, reserve, horizon)
            if booking is None and guard is None and now_us is None and (horizon is None or reserve)
            else None
        )
        plan = self._plan(limits, identity, cost, mode)
        if isinstance(plan, Prepared):
            return plan
        plain = False
        if mode is not None and plan.wire is not None:
            plain = True
            if plan.sent is not None:
                t = plan.sent.get(mode)
                if t is not None:
                    return self._fill(
                        plan.charges, plan.anchor, t.keys, t.argv, t.before, t.mid, t.after, reserve
                    )
        if horizon is not None:  # (a template's horizon was checked when it was made)
            _check_horizon(horizon)
        if plain and plan.sent is None and not (adaptive and plan.follows):
            return self._assemble(plan, peek, adaptive, reserve, horizon)
        if booking is not None:
            booking = self.keyspace.check_booking_id(booking)
            bmode = "old"
        elif reserve:
            booking = token_urlsafe(12)
            bmode = "new"
        else:
            bmode = ""
        nonce = booking or self._nonces.next()
        head = [
            "" if now_us is None else str(int(now_us)),
            "p" if peek else "1" if reserve else "0",
            "" if horizon is None else str(round(horizon * _US)),
            bmode,
            nonce,
            self._grace,
            "" if guard is None else _guard_arg(guard),
        ]
        work_id = None if guard is None else guard.work_id
        if self.sharded:
            groups = self._group(plan.charges)
            if len(groups) > 1:
                return (groups, head, booking, nonce, work_id)
            keys, argv = self._admit_args(groups[0], head, booking, work_id, adaptive)
            return Prepared(groups[0], keys, argv, booking, nonce)
        extra: list[str] = []  # the keys after the buckets'
        if adaptive and plan.follows:
            fspec = self._factor_spec(plan.follows, plan.anchor, extra)
            tail = plan.argv_adaptive
        else:
            fspec, tail = "", plan.argv
        if booking is not None:
            extra.append(self.keyspace.booking_key(plan.anchor, booking))
        if guard is not None:
            extra.append(self.keyspace.guard_key(plan.anchor, guard.work_id))
        frame = None
        keys = [*plan.keys, *extra]
        argv = [*head, fspec, *tail]
        if plan.wire is not None:
            adapts = tail is not plan.argv
            start, mid, after = self._encode_call(plan.wire, len(extra), head, fspec, adapts)
            before = b"".join((start, plan.wire.keys, *map(_bulk, extra), mid))
            frame = before + _bulk(nonce) + after
            if plain and plan.sent is not None:
                if self._sent >= _PLANS:  # (a horizon computed per call, say)
                    for remembered in self._plans.values():
                        if remembered.sent:
                            remembered.sent.clear()
                    self._sent = 0
                self._sent += 1
                template = _Template(keys, list(argv), before, after)
                if booking is not None:  # the last key names it: cut it out
                    name = extra[-1].encode()
                    bulk = b"$%d\r\n%s\r\n" % (len(name), name)
                    cut = before.rindex(bulk)
                    template = template._replace(
                        keys=keys[:-1], before=before[:cut], mid=before[cut + len(bulk) :]
                    )
                plan.sent[(peek, adaptive, reserve, horizon)] = template
        return Prepared(plan.charges, keys, argv, booking, nonce, frame)

    def _assemble(
        self, plan: _Plan, peek: bool, adaptive: bool, reserve: bool, horizon: float | None
    ) -> Prepared:
        """A plain admission of a plan not remembered (identities that seldom recur, as with
        many thousands of tenants), put together from its shape's packed parts (see
        :meth:`_packed`) and its own keys, packed with the plan."""
        memo = (plan.argv, peek, adaptive, reserve, horizon)
        parts = self._parts.get(memo) or self._packed(memo, plan.wire)
        before = parts.start + plan.wire.keys
        keys = list(plan.keys)
        return self._fill(
            plan.charges, plan.anchor, keys, parts.argv, before, parts.mid, parts.after, reserve
        )

    def _fresh(
        self,
        shape: _Shape,
        parts: list[str],
        n: int,
        peek: bool,
        adaptive: bool,
        reserve: bool,
        horizon: float | None,
    ) -> Prepared:
        """:meth:`_assemble` for an identity whose plan would not be remembered, from its
        shape's key template filled in (``parts``: tag and key of each limit, ``n`` of them,
        then the keys as the store packs them), without making the plan: with many thousands
        of tenants this is every admission."""
        memo = (shape.argv, peek, adaptive, reserve, horizon)
        packed = self._parts.get(memo)
        if packed is None:
            packed = self._packed(memo, self._with_keys(shape.wire, parts[n], n // 2))
        buckets, charges = _filled(shape, parts, n)
        before = packed.start + parts[n].encode()  # (see _keys_text)
        return self._fill(
            charges,
            buckets[shape.anchor].tag,
            parts[1:n:2],
            packed.argv,
            before,
            packed.mid,
            packed.after,
            reserve,
        )

    def _packed(
        self, memo: tuple[tuple[str, ...], bool, bool, bool, float | None], wire: Any
    ) -> _Parts:
        """The packed parts of the plain admissions ``memo`` names (their shape's argv, peek,
        adaptive, reserve, horizon) of plans encoded as ``wire``, made and kept for every plan
        of that shape."""
        argv, peek, _, reserve, horizon = memo
        if horizon is not None:
            _check_horizon(horizon)
        head = [
            "",
            "p" if peek else "1" if reserve else "0",
            "" if horizon is None else str(round(horizon * _US)),
            "new" if reserve else "",
            "",
            self._grace,
            "",
        ]
        start, mid, after = self._encode_call(wire, int(reserve), head, "", False)
        parts = _Parts(start, mid, after, [*head, "", *argv])
        if len(self._parts) >= 64:  # shapes are configuration, mostly
            self._parts.clear()
        self._parts[memo] = parts
        return parts

    def _fill(
        self,
        charges: tuple[Charge, ...],
        anchor: str,
        keys: list[str],
        argv: list[str],
        before: bytes,
        mid: bytes,
        after: bytes,
        reserve: bool = False,
    ) -> Prepared:
        """A plain admission packed ahead (by its plan's template or its shape's parts) with a
        nonce of its own: ``before``, then the booking key when it ``reserve``s (named by a new
        booking id, which is its nonce, in the hash tag ``anchor``), ``mid``, the nonce,
        ``after``. ``keys`` and ``argv`` are its keys but the booking key and its arguments but
        the nonce (argv[4]); neither is changed."""
        argv = argv.copy()
        # (One %-format: a call to _bulk for each part costs this hot path about 0.3 us more.)
        if reserve:
            booking = nonce = token_urlsafe(12)
            bkey = self.keyspace.booking_key(anchor, booking)
            keys = [*keys, bkey]
            data, name = booking.encode(), bkey.encode()
            frame = b"%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s" % (
                before,
                len(name),
                name,
                mid,
                len(data),
                data,
                after,
            )
        else:
            booking, nonce = None, self._nonces.next()
            data = nonce.encode()
            frame = b"%s%s$%d\r\n%s\r\n%s" % (before, mid, len(data), data, after)
        argv[4] = nonce
        return _new(Prepared, (charges, keys, argv, booking, nonce, frame))

    def _encode_args(self, argv: Sequence[str], argv_adaptive: Sequence[str]) -> Any:
        """An admission shape's script arguments encoded ahead, by a store that sends the
        script call itself (see :meth:`_encode_call`); None for none."""
        return None

    def _encode_keys(self, keys: Sequence[str], args: Any) -> Any:
        """An admission plan's keys encoded ahead, with its shape's ``args`` (from
        :meth:`_encode_args`); None for none."""
        return None

    def _key_template(self, ids: tuple[int, ...], args: Any) -> KeyTemplate | None:
        """The keys of the limits checked as ``ids`` as a template (see
        :meth:`Keyspace.key_template`), with their encoding by :meth:`_encode_keys` for a
        shape whose arguments encode as ``args`` (for :meth:`_with_keys`). Made once per list
        of limits: shapes of costs that vary per call (an estimate of LLM tokens) share it."""
        known = self._key_templates.get(ids)
        if known is not None:
            return known[1]
        limits = self._checked[ids].limits
        if args is None:
            template = self.keyspace.key_template(limits)
        else:
            encode, text = self._encode_keys, self._keys_text
            template = self.keyspace.key_template(limits, lambda keys: text(encode(keys, args)))
        if len(self._key_templates) >= _SHAPES:  # limit lists are configuration, mostly
            self._key_templates.clear()
        self._key_templates[ids] = (limits, template)  # the limits kept alive: ids stay theirs
        return template

    def _keys_text(self, wire: Any) -> str | None:
        """The keys' part of an encoding by :meth:`_encode_keys` (``wire.keys``, bytes), as
        the ASCII text that encodes to it, holding each key verbatim (for a template: see
        :meth:`_key_template`), or None: then admissions of plans not remembered lay out and
        encode their keys each time. A store that gives it gives :meth:`_with_keys` too."""
        return None

    def _with_keys(self, args: Any, text: str, nkeys: int) -> Any:
        """What :meth:`_encode_keys` gives for a shape's ``args`` and ``nkeys`` keys whose
        part (:meth:`_keys_text`) is ``text``."""
        raise NotImplementedError

    def _encode_call(
        self, wire: Any, nextra: int, head: list[str], fspec: str, adaptive: bool
    ) -> tuple[bytes, bytes, bytes]:
        """The admission script call of a plan encoded by :meth:`_encode_keys` (never called
        without one) with ``nextra`` keys after its buckets' and ``head``, ``fspec`` and the
        plan's (adaptive) argv for arguments, in three parts: the call is the first part, the
        buckets' keys (``wire.keys``, packed), the extra keys (packed as :func:`_bulk` packs
        them), the second part, the nonce (``head[4]``, packed so too) and the third part."""
        raise NotImplementedError

    def _run_prepared(self, prepared: Prepared) -> Sequence[Any]:
        """Run a prepared admission's script and return the reply."""
        return self._run_admit(prepared.keys, prepared.argv)

    def _factor_spec(self, follows: str, anchor: str, keys: list[str]) -> str:
        """ARGV[8] of the admission script for limits that follow the factors (``follows`` is
        "a" when they follow the load factor only, "k" when one also follows its tenant's
        upstream factor); the factor keys the script reads are appended to ``keys``."""
        load = self._load_source()
        if load == "k":
            keys.append(self.keyspace.load_factor_key())
        if follows == "k":
            keys.append(self.keyspace.upstream_key(anchor))
            return f"{load} k"
        return f"{load} -"

    def _load_source(self) -> str:
        """How the script gets the load factor: "k" to read its key (every store whose keys
        can share one script run), or the factor itself as a number."""
        return "k"

    def finish(self, prepared: Prepared, reply: Sequence[Any]) -> Decision:
        """The decision of a prepared admission, from the script's reply."""
        return self._decision(
            prepared.charges, reply, prepared.booking, prepared.nonce, prepared.argv[7] != ""
        )

    def finish_peek(self, prepared: Prepared, reply: Sequence[Any]) -> Decision:
        """The answer of a prepared peek, from the script's reply (as :meth:`peek` gives it:
        no receipt, as nothing was charged)."""
        decision = self.finish(prepared, reply)
        if decision.allowed:
            return Decision(Outcome.ADMITTED, 0.0, None, decision.limits, at=decision.at)
        return Decision(
            Outcome.DENIED,
            decision.retry_after,
            decision.bound_by,
            decision.limits,
            at=decision.at,
        )

    def set_guard(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        guard: Guard,
        ttl: float,
    ) -> bool:
        """Remember ``guard.token`` as the live copy of ``guard.work_id`` for ``ttl`` seconds.

        Call it after the new copy is published and before the old one is acknowledged: a crash
        before it leaves the old copy live (the new one is then dropped as stale), a crash after
        it leaves the new one live. With ``guard.after`` (the hand-over the denial recorded),
        nothing is recorded and False is returned if another copy took the work over since:
        the old copy, come back because its acknowledgement was lost, was admitted first; the
        new copy will then be dropped as stale.
        """
        if not guard.token:
            raise ConfigurationError("guard", "a token is needed to set a guard")
        tag = _anchor(self.charges(limits, identity, 0))
        key = self.keyspace.guard_key(tag, guard.work_id)
        return self._set_guard(key, guard.token, guard.after or "", ttl)

    def close_guard(self, charges: Sequence[Charge], work_id: str, token: str, ttl: float) -> bool:
        """Record that the copy ``token`` of ``work_id`` (admitted with ``charges``) has done
        the work: any copy that comes later, this one redelivered included (its
        acknowledgement lost with the broker), is then stale. False when the guard names
        another copy (nothing is changed then)."""
        key = self.keyspace.guard_key(_anchor(charges), work_id)
        return self._set_guard(key, GUARD_DONE, token, ttl)

    def _group(self, charges: tuple[Charge, ...]) -> list[tuple[Charge, ...]]:
        groups: dict[Hashable, list[Charge]] = {}
        for charge in charges:
            groups.setdefault(self._slot(charge.bucket.tag), []).append(charge)
        # The tenant's own slot goes first: it is the one most likely to deny.
        ordered = sorted(groups.values(), key=lambda g: g[0].limit.is_global)
        return [tuple(g) for g in ordered]

    def _admit_args(
        self,
        charges: Sequence[Charge],
        head: list[str],
        booking: str | None,
        work_id: str | None = None,
        adaptive: bool = False,
    ) -> tuple[list[str], list[str]]:
        follows = _follows(charges) if adaptive else ""
        keys, tail = _limit_args(charges, bool(follows))
        fspec = self._factor_spec(follows, _anchor(charges), keys) if follows else ""
        argv = [*head, fspec, *tail]
        if head[3]:
            assert booking is not None
            keys.append(self.keyspace.booking_key(_anchor(charges), booking))
        if head[6]:
            assert work_id is not None
            keys.append(self.keyspace.guard_key(_anchor(charges), work_id))
        return keys, argv

    def _admit_sharded(
        self,
        groups: list[tuple[Charge, ...]],
        head: list[str],
        booking: str | None,
        nonce: str,
        now_us: int | None,
        work_id: str | None,
        adaptive: bool = False,
    ) -> Decision:
        """One script run per slot, in order; a later denial refunds the earlier charges.

        Bookings are kept (booking mode "keep") until every slot admitted, then deleted, so a
        denial in a later slot does not consume a booking held in an earlier one. The guard is
        checked in the first slot only; a denial in a later slot records the hand-over there
        afterwards, as a denial in the first slot's script does.
        """
        guard = head[6]
        redeem = head[3] == "old"
        # The first slot checks the guard but does not record the copy as admitted: a later
        # slot may deny, or not answer, and the copy, deferred as it is, must stay the live one.
        first = ""
        if guard:
            fields = guard.split(" ")
            fields[5] = "-"
            first = " ".join(fields)
        head = [*head[:3], "keep" if redeem else head[3], *head[4:6], first]
        done: list[tuple[tuple[Charge, ...], Sequence[Any]]] = []
        for group in groups:
            reply = self._run_admit(*self._admit_args(group, head, booking, work_id, adaptive))
            head = [*head[:6], ""]
            if _OUTCOMES.get(reply[0]) not in _ALLOWED:
                states: list[LimitState] = []
                for earlier, earlier_reply in done:
                    self._refund(earlier, earlier_reply, nonce, now_us, adaptive)
                    states += self._probe(earlier, head, adaptive)
                if done and guard and work_id is not None:
                    self._hand_over(_anchor(groups[0]), work_id, guard)
                decision = self._decision(group, reply, booking, nonce, adaptive)
                return Decision(
                    decision.outcome,
                    decision.retry_after,
                    decision.bound_by,
                    (*states, *decision.limits),
                    decision.booking,
                    None,
                    decision.at,
                )
            done.append((group, reply))
        if redeem:
            assert booking is not None
            for group in groups:
                self._delete([self.keyspace.booking_key(_anchor(group), booking)])
        if guard and work_id is not None:
            token, _, ttl_ms, generation, _, _, call = guard.split(" ")
            if token != "-":  # admitted in every slot: record the copy as admitted
                key = self.keyspace.guard_key(_anchor(groups[0]), work_id)
                self._set_text(key, f"{token}*{generation}*{call}", int(ttl_ms) / 1000)
        all_charges = tuple(c for g in groups for c in g)
        states = [s for g, r in done for s in self._states(g, r)]
        outcome = Outcome.ADMITTED
        if any(_OUTCOMES.get(r[0]) is Outcome.REDEEMED for _, r in done):
            outcome = Outcome.REDEEMED
        receipt = Receipt(all_charges, nonce, adaptive)
        # Decided when the last slot admitted (one store, one clock: its servers').
        at = _reply_at(done[-1][1], len(done[-1][0])) / _US
        return Decision(outcome, 0.0, None, tuple(states), None, receipt, at)

    def _hand_over(self, tag: str, work_id: str, guard: str) -> None:
        """Record "<token>><next>" in the guard key, as admit.lua does on a denial (``guard`` is
        its ARGV[7]: the copy's token, the next copy's, the time to live in ms, the message's
        retry and deferral counts, whether the broker redelivered it, whether to record an
        admission, the call's id)."""
        token, following, ttl_ms, *_ = guard.split(" ")
        if following != "-":
            key = self.keyspace.guard_key(tag, work_id)
            self._set_text(key, f"{token}>{following}", int(ttl_ms) / 1000)

    def _probe(
        self, group: tuple[Charge, ...], head: list[str], adaptive: bool
    ) -> tuple[LimitState, ...]:
        """The states of ``group`` as they are now, read by a zero-cost admission."""
        free = tuple(Charge(c.limit, c.bucket, 0.0) for c in group)
        plain = [head[0], "0", "", "", head[4], head[5], ""]
        args = self._admit_args(free, plain, None, None, adaptive)
        return self._states(free, self._run_admit(*args))

    def _refund(
        self,
        group: tuple[Charge, ...],
        reply: Sequence[Any],
        nonce: str,
        now_us: int | None,
        adaptive: bool,
    ) -> None:
        # Limits a booking paid for were not charged by this call: nothing to give back there.
        charged = [c for i, c in enumerate(group) if not _booked(reply, i) and c.cost > 0]
        if charged:
            self._settle_group(charged, [-c.cost for c in charged], nonce, now_us, adaptive)

    # -- the reply ---------------------------------------------------------------------------

    def _states(self, charges: Sequence[Charge], reply: Sequence[Any]) -> tuple[LimitState, ...]:
        if _OUTCOMES.get(reply[0]) is _ADMITTED:
            return _short_states(charges, reply)
        return tuple(
            [
                _new(
                    LimitState,
                    (c.limit.name, reply[j] / _US, reply[j + 1] / _US, reply[j + 2] / _US),
                )
                for c, j in zip(charges, range(3, 3 + 4 * len(charges), 4), strict=True)
            ]
        )

    def _decision(
        self,
        charges: tuple[Charge, ...],
        reply: Sequence[Any],
        booking: str | None,
        nonce: str,
        adaptive: bool = False,
    ) -> Decision:
        try:
            outcome = _OUTCOMES[reply[0]]
            if outcome is _ADMITTED:  # nearly every admission's (the short reply): kept lean
                states = _short_states(charges, reply)
                receipt = _new(Receipt, (charges, nonce, adaptive))
                at = reply[1 + 2 * len(charges)] / _US
                return _new(Decision, (outcome, 0.0, None, states, None, receipt, at))
            if outcome is _STALE:
                return Decision(outcome, 0.0, None, ())
            states = self._states(charges, reply)
            at = _reply_at(reply, len(charges)) / _US
            if outcome in _ALLOWED:
                receipt = _new(Receipt, (charges, nonce, adaptive))
                return _new(Decision, (outcome, 0.0, None, states, None, receipt, at))
            binding = int(reply[1])
            if not 1 <= binding <= len(charges):
                raise IndexError(binding)
            bound = charges[binding - 1].limit.name
            retry = reply[2] / _US
        except (IndexError, KeyError, ValueError, TypeError, OverflowError) as exc:
            raise StoreError(f"unexpected reply from the admission script: {reply!r}") from exc
        keeps_booking = outcome in (Outcome.BOOKED, Outcome.EARLY)
        return Decision(
            outcome,
            retry,
            bound,
            states,
            booking if keeps_booking else None,
            None,
            at,
        )

    # -- adaptive factors ----------------------------------------------------------------------

    def report_load(
        self,
        target: float,
        *,
        floor: float = 0.1,
        step: float = 0.25,
        relax: float = 5.0,
        ttl: float = 5.0,
        now_us: int | None = None,
    ) -> LoadFactor:
        """Report the load factor a worker's samples call for (in [0, 1]; 1 is no load).

        The computed factor falls to ``target`` at once (never below ``floor``) and rises by at
        most ``step`` per ``relax`` seconds, however many workers report; it lapses to 1 when
        nobody has reported for ``ttl`` seconds. An operator's override wins over it.
        """
        value = _fraction(target, "target", zero=True)
        args = [
            value,
            _fraction(floor, "floor", least=MIN_FACTOR),
            _fraction(step, "step"),
            str(round(_seconds(relax, "relax", zero=True) * _US)),
            str(max(1, round(_seconds(ttl, "ttl") * 1000))),
        ]
        return self._load("target", args, now_us)

    def record_sample(
        self, worker: str, sample: str | None, *, max_age: float, now_us: int | None = None
    ) -> list[str]:
        """Record ``worker``'s latest load ``sample`` (any text; None records nothing) and
        return every worker's sample recorded within the last ``max_age`` seconds, on the
        store's clock; older ones are dropped."""
        if not isinstance(worker, str) or not worker:
            raise ConfigurationError("worker", f"must be a non-empty string, got {worker!r}")
        if sample is not None and (not isinstance(sample, str) or not sample):
            raise ConfigurationError("sample", "must be a non-empty string or None")
        argv = [
            "" if now_us is None else str(int(now_us)),
            worker,
            sample or "",
            str(round(_seconds(max_age, "max_age") * _US)),
        ]
        return [_text(v) for v in self._run_sample([self.keyspace.load_samples_key()], argv)]

    # -- operators' tools ---------------------------------------------------------------------

    def upstream_factor(self, identity: Mapping[str, object]) -> float:
        """The upstream factor in force for the tenant of ``identity`` (1 when none is)."""
        value = self._get_number(self.keyspace.upstream_key(self.keyspace.tenant_tag(identity)))
        return value if value is not None and 0 < value <= 1 else 1.0

    def reset(self, limits: Sequence[Limit], identity: Mapping[str, object]) -> int:
        """Forget the buckets of ``limits`` for ``identity`` (they start full again); return
        how many keys were deleted. A limit keyed by dimensions the identity leaves out (an
        agent limit for an API key alone) is reset for every value of them: every agent of
        the key. Bookings and deferral guards are kept: work already deferred returns as
        planned. A global limit (not keyed by API key) is everyone's: resetting it resets it
        for every tenant that shares the bucket."""
        if isinstance(limits, Limit):
            limits = (limits,)
        keys: list[str] = []
        for limit in limits:
            # Past the API key (whose absence is the anonymous tenant, one bucket).
            others = () if limit.is_global else limit.per[1:]
            if all(identity.get(dim) is not None for dim in others):
                bucket = self.keyspace.bucket(limit, identity)
                keys.append(bucket.key)
                if limit.algorithm == "sliding_window":
                    keys.append(total_key(bucket))
                continue
            # The key of every value of the missing dimensions: a glob over the bucket key's
            # layout (prefix, tenant tag, limit name, then the other dimensions in order).
            tag = self.keyspace.bucket(limit, {"api_key": identity.get("api_key")}).tag
            parts = [
                "*" if identity.get(dim) is None else self.keyspace.fingerprint(dim, identity[dim])
                for dim in limit.per[1:]
            ]
            pattern = ":".join([self.keyspace.prefix, tag, limit.name, *parts])
            keys += self.scan_keys(pattern)[0]
            if limit.algorithm == "sliding_window" and parts[-1] != "*":
                keys += self.scan_keys(pattern + ":~n")[0]
        if not keys:
            return 0
        return self._delete_counted(keys)

    def scan_keys(self, match: str, *, most: int = 100_000) -> tuple[list[str], bool]:
        """The keys matching the glob ``match`` (which must start with this store's prefix), at
        most ``most`` of them, and whether that is all of them. It scans the whole keyspace
        (``SCAN``, in batches): for operators' tools, not for the admission path."""
        if not match.startswith(self.keyspace.prefix + ":"):
            raise ConfigurationError("match", f"must start with {self.keyspace.prefix + ':'!r}")
        return self._scan(match, most)

    def _get_number(self, key: str) -> float | None:
        raise NotImplementedError

    def _delete_counted(self, keys: list[str]) -> int:
        raise NotImplementedError

    def _scan(self, match: str, most: int) -> tuple[list[str], bool]:
        raise NotImplementedError

    # -- traffic counts, for operators' tools --------------------------------------------------

    def add_counts(
        self, counts: Mapping[str, float], *, retention: float, now_us: int | None = None
    ) -> None:
        """Add ``counts`` (field -> amount) to the current minute's tally, which is kept for
        ``retention`` seconds. Minutes are the store's clock's (Redis ``TIME``): every worker
        adds to the same minute. Not on the admission path: callers batch their counts."""
        if not counts:
            return
        for name, amount in counts.items():
            if not isinstance(name, str) or not name or not _positive(amount, zero=True):
                raise ConfigurationError(
                    "counts",
                    f"a count is a field name and an amount >= 0, got {name!r}: {amount!r}",
                )
        now = self._now_us() if now_us is None else now_us
        key = self.keyspace.counts_key(now // _MINUTE_US)
        ttl = _seconds(retention, "retention") + 60
        self._add_counts(key, counts, ttl)

    def counts(
        self, minutes: int, *, now_us: int | None = None
    ) -> list[tuple[int, dict[str, float]]]:
        """The tallies of the last ``minutes`` minutes, the current one included, oldest
        first: (the minute's start in seconds of the store's clock, its fields)."""
        if not isinstance(minutes, int) or isinstance(minutes, bool) or minutes < 1:
            raise ConfigurationError("minutes", f"must be an integer >= 1, got {minutes!r}")
        now = self._now_us() if now_us is None else now_us
        last = now // _MINUTE_US
        span = range(last - minutes + 1, last + 1)
        found = self._read_counts([self.keyspace.counts_key(m) for m in span])
        return [(m * 60, fields) for m, fields in zip(span, found, strict=True)]

    def server_time(self) -> float:
        """The store's clock now, in seconds since the epoch (the clock admissions run on)."""
        return self._now_us() / _US

    def _now_us(self) -> int:
        """The store's clock now, in microseconds."""
        raise NotImplementedError

    def _add_counts(self, key: str, counts: Mapping[str, float], ttl: float) -> None:
        raise NotImplementedError

    def _read_counts(self, keys: list[str]) -> list[dict[str, float]]:
        raise NotImplementedError

    def override_load_factor(
        self, factor: float | None, *, now_us: int | None = None
    ) -> LoadFactor:
        """Set the load factor cluster-wide (in (0, 1]) until cleared with None."""
        if factor is None:
            return self._load("clear", ["", "", "", "", "1"], now_us)
        factor_arg = _fraction(factor, "factor", least=MIN_FACTOR)
        return self._load("override", [factor_arg, "", "", "", "1"], now_us)

    def load_factor(self, *, now_us: int | None = None) -> LoadFactor:
        """The load factor in force, the computed one and the override."""
        return self._load("read", ["", "", "", "", "1"], now_us)

    def _load(self, op: str, args: list[str], now_us: int | None) -> LoadFactor:
        ks = self.keyspace
        keys = [ks.load_factor_key(), ks.load_state_key(), ks.load_override_key()]
        argv = ["" if now_us is None else str(int(now_us)), op, *args]
        force, computed, override = (_text(v) for v in self._run_load(keys, argv))
        return LoadFactor(float(force), float(computed), float(override) if override else None)

    def upstream_throttled(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        *,
        delay: float | None = None,
        remaining: Mapping[str, float] | None = None,
        paused: Collection[str] | None = None,
        hold: float | None = None,
        quiet: float = 0.0,
        decrease: float = 0.5,
        floor: float = 0.05,
        ttl: float = 3600.0,
        adaptive: bool = True,
        now_us: int | None = None,
    ) -> float:
        """The provider throttled a call of this tenant (``identity['api_key']``).

        Its upstream factor is multiplied by ``decrease``, never below ``floor``, and returns
        to 1 after ``ttl`` seconds without news; further calls within ``hold`` seconds (default:
        ``delay``, at least one second) do not cut it again, since the 429s of calls already in
        flight belong to the same episode; for ``quiet`` seconds after that, successes do not
        raise it yet. Its buckets of ``limits`` (of those named in
        ``paused``, when given) are paused for ``delay`` seconds (nothing passes before the
        pause ends; then one unit is free and the bucket refills), and each limit named in
        ``remaining`` is brought down to that many free units (both may apply to one limit:
        the later of the two wins). Limits without ``api_key`` (shared by every tenant) are left
        alone. With ``adaptive`` (as the tenant's admissions are made), units are counted at the
        new factor. Returns the new upstream factor.
        """
        wait = None if delay is None else round(_seconds(delay, "delay", zero=True) * _US)
        if hold is None:
            held = max(wait or 0, _US)
        else:
            held = round(_seconds(hold, "hold", zero=True) * _US)
        head = [
            _fraction(decrease, "decrease"),
            _fraction(floor, "floor", least=MIN_FACTOR),
            str(held),
            str(round(_seconds(quiet, "quiet", zero=True) * _US)),
        ]
        return self._upstream(
            "throttled", head, limits, identity, wait, paused, remaining, ttl, adaptive, now_us
        )

    def upstream_ok(
        self,
        identity: Mapping[str, object],
        *,
        successes: int = 1,
        step: float = 0.05,
        limits: Sequence[Limit] = (),
        remaining: Mapping[str, float] | None = None,
        quiet: float = 0.0,
        ttl: float = 3600.0,
        adaptive: bool = True,
        now_us: int | None = None,
    ) -> float:
        """Calls of this tenant succeeded: its upstream factor rises by ``step`` per success,
        up to 1 (``successes=0`` changes nothing there; nor do successes during the hold of
        the last cut and ``quiet`` seconds after it: pass the cuts' ``quiet``); each of
        ``limits`` named in ``remaining`` (what the provider's last answer said is left) is
        brought down to that many free units. Returns the new upstream factor."""
        if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
            raise ConfigurationError("successes", f"must be an integer >= 0, got {successes!r}")
        change = fmt(float(_fraction(step, "step")) * successes)
        return self._upstream(
            "ok",
            [change, "1", "0", str(round(_seconds(quiet, "quiet", zero=True) * _US))],
            limits,
            identity,
            None,
            None,
            remaining,
            ttl,
            adaptive,
            now_us,
        )

    def _upstream(
        self,
        op: str,
        head: list[str],
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        wait: int | None,
        paused: Collection[str] | None,
        remaining: Mapping[str, float] | None,
        ttl: float,
        adaptive: bool,
        now_us: int | None,
    ) -> float:
        if isinstance(limits, Limit):
            limits = (limits,)
        left = dict(remaining or {})
        names = self._check(limits).names if limits else frozenset()
        for arg, named in (("remaining", left), ("paused", paused or ())):
            unknown = set(named) - names
            if unknown:
                raise ConfigurationError(arg, f"names limits not given: {sorted(unknown)}")
        for name, units in left.items():
            if not _positive(units, zero=True):
                raise ConfigurationError("remaining", f"{name}: must be units >= 0, got {units!r}")
        tenant = [lim for lim in limits if not lim.is_global]
        # The tenant's slot as its admissions anchor it (a limit's own `anonymous` value counts
        # for work without an API key).
        tag = (
            self.keyspace.bucket(tenant[0], identity).tag
            if tenant
            else self.keyspace.tenant_tag(identity)
        )
        keys = [self.keyspace.upstream_key(tag), self.keyspace.upstream_key(tag) + ":hold"]
        change, floor, held, quieted = head
        argv = [
            "" if now_us is None else str(int(now_us)),
            op,
            change,
            floor,
            str(max(1, round(_seconds(ttl, "ttl") * 1000))),
            self._nonces.next(),
            held,
            quieted,
            str(len(tenant)),
        ]
        for limit in tenant:
            bucket = self.keyspace.bucket(limit, identity)
            keys.append(bucket.key)
            if limit.algorithm == "sliding_window":
                keys.append(total_key(bucket))
            pause = wait is not None and (paused is None or limit.name in paused)
            argv += [
                *(limit.wire_adaptive if adaptive else limit.wire),
                str(wait) if pause else "",
                fmt(float(left[limit.name])) if limit.name in left else "",
            ]
        return float(_text(self._run_upstream(keys, argv)))

    # -- settlement --------------------------------------------------------------------------

    def settle(
        self, receipt: Receipt, usage: Mapping[str, float], *, now_us: int | None = None
    ) -> None:
        """Correct an admission's charges to the actual cost.

        ``usage`` maps limit names of the receipt to the units actually used. The difference to
        what was charged is refunded (the bucket never rises above its burst) or charged (the
        bucket may go into debt, and later work waits for it). Limits not named are unchanged.
        """
        if not isinstance(receipt, Receipt):
            raise ConfigurationError("receipt", f"must be a Receipt, got {receipt!r}")
        if not isinstance(usage, Mapping):
            raise ConfigurationError(
                "usage", f"must be a mapping of limit name to units, got {usage!r}"
            )
        by_name = {c.limit.name: c for c in receipt.charges}
        unknown = set(usage) - set(by_name)
        if unknown:
            raise ConfigurationError(
                "usage", f"names limits that the admission did not charge: {sorted(unknown)}"
            )
        changes: dict[Hashable, tuple[list[Charge], list[float]]] = {}
        for name, actual in usage.items():
            charge = by_name[name]
            value = _usage(charge.limit, actual)
            if value != charge.cost:
                group = changes.setdefault(self._slot(charge.bucket.tag), ([], []))
                group[0].append(charge)
                group[1].append(value - charge.cost)
        for group_charges, deltas in changes.values():
            self._settle_group(group_charges, deltas, receipt.nonce, now_us, receipt.adaptive)

    def _settle_group(
        self,
        charges: Sequence[Charge],
        deltas: Sequence[float],
        nonce: str,
        now_us: int | None,
        adaptive: bool = False,
    ) -> None:
        follows = _follows(charges) if adaptive else ""
        keys: list[str] = []
        limit_argv: list[str] = []
        for c, delta in zip(charges, deltas, strict=True):
            keys.append(c.bucket.key)
            if c.limit.algorithm == "sliding_window":
                keys.append(total_key(c.bucket))
            wire = c.limit.wire_adaptive if follows else c.limit.wire
            limit_argv += [*wire[:3], fmt(c.cost), fmt(delta)]
        fspec = self._factor_spec(follows, _anchor(charges), keys) if follows else ""
        now = "" if now_us is None else str(int(now_us))
        self._run_settle(keys, [now, nonce, fspec, str(len(charges)), *limit_argv])


def _filled(shape: _Shape, parts: list[str], n: int) -> tuple[list[Bucket], tuple[Charge, ...]]:
    """The buckets and charges of ``shape`` from its key template filled in: ``parts`` starts
    with each limit's tag and key (``n`` of them, in the order of its limits)."""
    # (A plain loop: map, zip and itertools.repeat cost more than twice as much here, once the
    # CPU's caches have lost them between two admissions, as a round trip's wait makes them.)
    limits, costs = shape.limits, shape.costs
    buckets = []
    charges = []
    for i in range(n // 2):
        bucket = _new(Bucket, (parts[2 * i], parts[2 * i + 1]))
        buckets.append(bucket)
        charges.append(_new(Charge, (limits[i], bucket, costs[i])))
    return buckets, tuple(charges)


def _limit_args(charges: Sequence[Charge], adaptive: bool) -> tuple[list[str], list[str]]:
    """The keys of the charges' buckets, and each limit's arguments to the admission script
    (its kind, two numbers, its cost: see admit.lua): the part of them that the limits make."""
    keys: list[str] = []
    argv: list[str] = []
    tags = [c.bucket.tag for c in charges]
    narrower = _narrower(tuple([c.limit.per for c in charges]), tuple(map(tags.index, tags)))
    for c, suffix in zip(charges, narrower, strict=True):
        keys.append(c.bucket.key)
        if c.limit.algorithm == "sliding_window":
            keys.append(total_key(c.bucket))
        kind, first, second = _admit_wire(c.limit.wire_adaptive if adaptive else c.limit.wire)
        argv += (kind + suffix, first, second, fmt(c.cost))
    return keys, argv


@functools.lru_cache(maxsize=1024)
def _admit_wire(wire: tuple[str, str, str, str]) -> tuple[str, str, str]:
    """A limit's wire form (kind, period in us, count, burst) as admit.lua takes it: a token
    bucket's emission interval T and burst in time tau, computed as the script computed them
    before (the same operations on the same doubles, written bit-exact), or a window's
    period and count."""
    kind, period, count, burst = wire
    if kind[0] != "t":
        return kind, period, count
    interval = float(period) / float(count)
    return kind, fmt(interval), fmt(float(burst) * interval)


@functools.lru_cache(maxsize=256)
def _narrower(pers: tuple[tuple[str, ...], ...], slots: tuple[int, ...]) -> tuple[str, ...]:
    """For each limit (given by its dimensions, and by the first limit sharing its hash tag),
    the suffix of its kind in admit.lua naming the limits keyed by its dimensions and more
    under the same hash tag (an agent's share within its key's limit): a booking in it books
    them too ('' for none). A global limit has a tag of its own, so a booking in it books
    nothing more: the same on one server as on a cluster, where it runs apart."""
    scopes = [frozenset(per) for per in pers]
    out = []
    for i, scope in enumerate(scopes):
        found = [
            str(j + 1) for j, other in enumerate(scopes) if other > scope and slots[j] == slots[i]
        ]
        out.append(">" + ".".join(found) if found else "")
    return tuple(out)


def _follows(charges: Sequence[Charge]) -> str:
    """Which factors the charges' limits follow: "k" when one follows its tenant's upstream
    factor, "a" when some follow the load factor only, "" when none is adaptive."""
    kinds = {c.limit.wire_adaptive[0][1:] for c in charges}
    return "k" if "k" in kinds else "a" if "a" in kinds else ""


def _cost_key(ids: tuple[int, ...], cost: dict[Any, Any]) -> Hashable | None:
    """A dict key for per-limit costs (None unless every cost is a plain int or float)."""
    flat: list[object] = []
    for name, c in cost.items():
        if type(c) is not int and type(c) is not float:
            return None
        flat += (name, c)
    return (ids, tuple(flat))


def _anchor(charges: Sequence[Charge]) -> str:
    """The hash tag an admission's booking and guard keys live under: the tenant's, when any
    limit has one (the slot that goes first on a cluster), else the first limit's."""
    for charge in charges:
        if not charge.limit.is_global:
            return charge.bucket.tag
    return charges[0].bucket.tag


def _guard_arg(guard: Guard) -> str:
    if not _positive(guard.ttl, most=MAX_SPAN):
        raise ConfigurationError(
            "guard.ttl", f"must be seconds in (0, {MAX_SPAN:g}], got {guard.ttl!r}"
        )
    for token in (guard.token, guard.next):
        if token is not None and (
            not token or not token.isascii() or " " in token or ">" in token or "*" in token
        ):
            raise ConfigurationError(
                "guard", "tokens are non-empty ASCII without spaces, '>' or '*'"
            )
    for name, count in (("guard.retries", guard.retries), ("guard.deferrals", guard.deferrals)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError(name, f"must be an integer >= 0, got {count!r}")
    ttl_ms = max(1, round(guard.ttl * 1000))
    generation = f"{guard.retries}.{guard.deferrals}"
    again = int(guard.redelivered)
    call = secrets.token_hex(4)  # this call's: a client that sends it again sends it too
    return f"{guard.token or '-'} {guard.next or '-'} {ttl_ms} {generation} {again} m {call}"


def _fraction(value: object, name: str, *, zero: bool = False, least: float = 0.0) -> str:
    """A factor in (0, 1] (or [0, 1] with ``zero``, or [least, 1]) as the scripts take it."""
    number = finite_number(value)
    if least:
        low, ok = f"[{least:g}", number is not None and least <= number <= 1
    elif zero:
        low, ok = "[0", number is not None and 0 <= number <= 1
    else:
        low, ok = "(0", number is not None and 0 < number <= 1
    if not ok:
        raise ConfigurationError(name, f"must be a number in {low}, 1], got {value!r}")
    return fmt(number)  # type: ignore[arg-type]


def _seconds(value: object, name: str, *, zero: bool = False) -> float:
    """Seconds > 0 (or >= 0 with ``zero``), at most MAX_SPAN."""
    if not _positive(value, zero=zero, most=MAX_SPAN):
        low = "[0" if zero else "(0"
        raise ConfigurationError(name, f"must be seconds in {low}, {MAX_SPAN:g}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _usage(limit: Limit, actual: object) -> float:
    """A usage report for ``limit`` as a float: a finite number >= 0, and no more than the limit
    grants in MAX_SPAN (a larger debt would outlive any key, and cannot be a real report)."""
    if not isinstance(actual, int | float) or isinstance(actual, bool):
        raise CostError(limit.name, actual, "usage must be a number")
    if (isinstance(actual, float) and not math.isfinite(actual)) or actual < 0:
        raise CostError(limit.name, actual, "usage must be a finite number >= 0")
    most = min(MAX_UNITS, limit.burst + limit.rate.per_second * MAX_SPAN)
    if actual > most:
        raise CostError(
            limit.name,
            actual,
            f"usage above {most:g} {limit.unit} is more than the limit grants in ten years",
        )
    return float(actual)


def short_reply(reply: Sequence[Any], limits: int) -> bool:
    """Whether a script run's reply about ``limits`` limits is the short one, of an admission
    (or a peek) that passed and redeemed nothing (see admit.lua), and as long as it must be:
    ``reply[1 + 2 * i]`` and ``reply[2 + 2 * i]`` are then the ``i``-th limit's remaining
    units and time until its bucket is full again, in millionths (of units, of seconds), in
    the order of the run's limits (a prepared admission's ``charges``)."""
    return len(reply) == 2 + 2 * limits and _OUTCOMES.get(reply[0]) is _ADMITTED


def _short_states(charges: Sequence[Charge], reply: Sequence[Any]) -> tuple[LimitState, ...]:
    """The limits' states from the short reply of an admission (see :func:`short_reply`)."""
    states = []
    j = 1
    for c in charges:  # (a loop, not a comprehension: on every admission, one frame less)
        states.append(_new(LimitState, (c.limit.name, reply[j] / _US, reply[j + 1] / _US, 0.0)))
        j += 2
    return tuple(states)


def _booked(reply: Sequence[Any], index: int) -> bool:
    """Whether the booking presented paid for limit ``index`` (never, in a short reply)."""
    return _OUTCOMES.get(reply[0]) is not _ADMITTED and int(reply[3 + 4 * index + 3]) == 1


def _reply_at(reply: Sequence[Any], limits: int) -> Any:
    """When an admission script run of ``limits`` limits decided (us), from its reply."""
    if _OUTCOMES.get(reply[0]) is _ADMITTED:  # the short reply
        return reply[1 + 2 * limits]
    return reply[3 + 4 * limits]


def _check_horizon(horizon: object) -> None:
    """Refuse a booking horizon that is not seconds in [0, MAX_SPAN]."""
    if not _positive(horizon, zero=True, most=MAX_SPAN):
        raise ConfigurationError(
            "horizon", f"must be seconds in [0, {MAX_SPAN:g}] or None, got {horizon!r}"
        )


def _bulk(text: str) -> bytes:
    """``text`` as a RESP bulk string: how a script call's keys and arguments go on the wire."""
    data = text.encode("utf-8", "surrogatepass")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _positive(value: object, *, zero: bool = False, most: float = math.inf) -> bool:
    """Whether ``value`` is a finite number > 0 (>= 0 with ``zero``), at most ``most``."""
    number = finite_number(value)
    if number is None or number > most:
        return False
    return number >= 0 if zero else number > 0
