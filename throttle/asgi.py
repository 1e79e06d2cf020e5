# SPDX-License-Identifier: MIT
"""Rate limits at the HTTP door: an ASGI middleware that answers 429 before anything is queued.

``ThrottleMiddleware`` checks the same named limits as the Celery tasks (``throttle_limits``,
with the same tiers and the same Redis), so an API that enqueues agent work turns a tenant
away while its budget is spent instead of queueing work that would only wait. It is plain
ASGI (FastAPI, Starlette, or any ASGI app; no dependency on either)::

    app.add_middleware(ThrottleMiddleware, celery_app=celery, limits=["requests"])

Who is charged
    The API key from the ``X-API-Key`` header (``api_key_header``: another header name, or a
    callable taking the ASGI scope), the agent from ``agent_header`` when given, the tier from
    ``throttle_tier_resolver``: the buckets are the tasks' own. A request without an API key
    is charged per client IP (``scope["client"]``, an IPv6 one by its /64; behind a proxy
    let the server rewrite it,
    as uvicorn's ``--forwarded-allow-ips`` does) to ``ip_limits`` (default: the same limits),
    in buckets of their own that no API key can reach. The key is taken as sent: this
    middleware cannot tell a valid key from a made-up one, and a client that sends a new
    made-up key with each call gets a new bucket each time. Let ``api_key_header`` be a
    callable that returns the key only once it is known to be valid (None otherwise: the call
    is then charged per IP), or reject unknown keys before this middleware runs.

What it charges
    ``mode="charge"`` (the default) charges ``cost`` (1 per request, a mapping of limit name
    to cost, or a callable taking the scope) for endpoints that are the work.
    ``mode="check_only"`` charges nothing: it answers 429 when the cost would not fit now, for
    an endpoint that enqueues work whose task is charged when it runs. Limits in ``shadow``
    mode are not checked here.

What it answers
    Every checked answer carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and
    ``X-RateLimit-Reset`` (seconds until the bucket is full again) for the tightest limit,
    and the IETF ``RateLimit`` and ``RateLimit-Policy`` fields (draft-ietf-httpapi-ratelimit-
    headers) for every limit. A denial is a 429 with ``Retry-After`` (whole seconds, rounded
    up) and a JSON body: ``error``, ``message``, ``retry_after`` (exact seconds, rounded up
    to the microsecond) and ``limit``. A ``cost`` callable that raises, or returns what no
    limit takes, is the app's error (a 500), not the client's.

While Redis does not answer
    Each limit's ``on_store_error`` applies, as in the workers: ``closed`` answers 503 with
    ``Retry-After``, ``local`` uses in-process buckets at ``1/processes`` of the limit (set
    ``processes`` to the number of server processes, so that together they admit no more than
    the limit; in ``check_only`` mode too, these are charged, as nothing else charges them),
    ``open`` lets the request through. Redis is tried again after ``throttle_store_retry``
    seconds.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Final, Literal, NamedTuple

from throttle.celeryext.settings import DEFAULT_TIER, LimitPolicy, ThrottleSettings
from throttle.errors import ConfigurationError, CostError, StoreError, StoreUnavailable
from throttle.identity import Fingerprint
from throttle.limits import Limit, check_cost
from throttle.store import Decision, MemoryStore, RedisStore
from throttle.store.aio import AsyncStore
from throttle.store.base import Packed, Prepared, short_reply

__all__ = ["ThrottleMiddleware"]

logger = logging.getLogger("throttle.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Cost = float | Mapping[str, float]
Mode = Literal["charge", "check_only"]

_US: Final = 1_000_000
_MODES: Final = ("charge", "check_only")
_JSON: Final = (b"content-type", b"application/json")
#: At most this many identities' admissions are kept packed (see ThrottleMiddleware._send).
_PACKED: Final = 4096
_ceil: Final = math.ceil


class _Limits(NamedTuple):
    """Limits as the answers describe them."""

    limits: tuple[Limit, ...]
    by_name: Mapping[str, Limit]
    policy: bytes  # the RateLimit-Policy field: it does not change between answers
    #: Each limit, in order: its name and burst, and the burst as X-RateLimit-Limit says it
    quotas: tuple[tuple[str, float, bytes], ...]
    #: The RateLimit field with %d for each limit's remaining units and seconds until full
    ratelimit: bytes


class _Checked(NamedTuple):
    """What one tier's requests are checked against."""

    shared: _Limits  # the enforced limits
    closed: str | None  # the first limit that is closed while Redis is away
    local: _Limits  # the limits kept in-process while Redis is away (at their share)
    cost: Cost = 1  # a request's cost for these limits, when it is the same for every request


class ThrottleMiddleware:
    """Reject over-limit requests at the door (see the module docstring for the contract).

    ``celery_app`` is the Celery app whose ``throttle_*`` settings hold the limits; the
    :class:`~throttle.Throttle` extension installed on it is used (installed here if it is
    not). Every argument is checked here, when the app is built: an unknown limit name, a cost
    a limit can never admit, or a header name that is not one raises
    :class:`~throttle.errors.ConfigurationError` naming the argument.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        celery_app: Any,
        limits: Sequence[str],
        api_key_header: str | Callable[[Scope], str | None] = "X-API-Key",
        agent_header: str | Callable[[Scope], str | None] | None = None,
        ip_limits: Sequence[str] | None = None,
        exclude_paths: Iterable[str] = (),
        mode: Mode = "charge",
        cost: float | Mapping[str, float] | Callable[[Scope], Cost] = 1,
        processes: int = 1,
    ) -> None:
        from throttle.celeryext.app import Throttle  # the Celery layer, only when used

        self.app = app
        ext = getattr(celery_app, "_throttle_extension", None)
        if not isinstance(ext, Throttle):
            ext = Throttle(celery_app)
        self.ext = ext
        settings: ThrottleSettings = ext.settings
        self.settings = settings
        if mode not in _MODES:
            raise ConfigurationError("mode", f"unknown mode {mode!r}", " or ".join(_MODES))
        self.mode = mode
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigurationError("processes", f"must be an integer >= 1, got {processes!r}")
        self.processes = processes
        names = _names("limits", limits, settings)
        ip_names = names if ip_limits is None else _names("ip_limits", ip_limits, settings, True)
        self._tiers = {tier: self._checked(names, tier) for tier in settings.tiers}
        self._ip = self._checked(ip_names, DEFAULT_TIER)
        self._key_header = _header_source("api_key_header", api_key_header)
        self._agent_header = (
            None if agent_header is None else _header_source("agent_header", agent_header)
        )
        self._both = _both_headers(api_key_header, agent_header)
        self._exclude = frozenset(_paths(exclude_paths))
        self._under = tuple(p + "/" for p in self._exclude)  # what lies under each
        self._cost = _cost_source(cost, [*self._tiers.values(), self._ip])
        if not callable(cost):  # the same for every request: each set's part, computed now
            self._tiers = {t: c._replace(cost=_part(cost, c)) for t, c in self._tiers.items()}
            self._ip = self._ip._replace(cost=_part(cost, self._ip))
        self._default = self._tiers[DEFAULT_TIER]
        self._store = AsyncStore(ext.store(), timeout=settings.socket_timeout)
        self._peek = mode == "check_only"
        self._check = self._store.peek if self._peek else self._store.admit
        store = self._store.store
        self._finish = store.finish_peek if self._peek else store.finish
        #: (tier, API key, agent) -> its admission, packed but for the nonce (see _send);
        #: None when the cost is the request's (a callable's), or the store packs none.
        self._packed: dict[tuple[str, str, str | None], Packed] | None = (
            {}
            if self._cost is None and isinstance(store, RedisStore) and not store.sharded
            else None
        )
        self._local = MemoryStore(ext.keyspace, clock=ext.clock)
        self._down_until = 0
        self._adaptive = settings.adaptive.enabled

    def _checked(self, names: Sequence[str], tier: str) -> _Checked:
        policies: list[LimitPolicy] = [self.settings.policy(n, tier) for n in names]
        enforced = [p for p in policies if p.mode == "enforce"]
        closed = next((p.name for p in enforced if p.on_store_error == "closed"), None)
        local = [p.limit.share(self.processes) for p in enforced if p.on_store_error == "local"]
        return _Checked(_limits([p.limit for p in enforced]), closed, _limits(local))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # On every request: kept lean.
        if scope["type"] != "http" or (self._exclude and self._excluded(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        checked, identity, memo = self._who(scope)
        if not checked.shared.limits:
            await self.app(scope, receive, send)
            return
        cost = checked.cost if self._cost is None else _part(self._cost(scope), checked)
        shared = checked.shared
        fields = None
        decision: Decision | None = None
        if not self._down_until or self.ext.clock.now_us() >= self._down_until:
            try:
                # Nearly always sent at once on the loop's connection, and an admission's
                # reply read here straight into the fields: no Decision is made for it.
                sent = self._send(shared.limits, identity, memo, cost)
                if sent is None:
                    decision = await self._check(
                        shared.limits, identity, cost=cost, adaptive=self._adaptive
                    )
                else:
                    prepared, reply = sent[0], await sent[1]
                    if short_reply(reply, len(shared.quotas)):
                        fields = _short_fields(shared, reply)
                    else:
                        decision = self._finish(prepared, reply)
            except StoreError as exc:
                self._store_failed(exc)
        if fields is None:
            if decision is not None:
                described = shared
            else:
                decided = self._fallback(checked, identity, cost)
                if decided is None:  # open while Redis is away: unchecked, so nothing to tell
                    await self.app(scope, receive, send)
                    return
                if isinstance(decided, str):
                    wait = max(self._down_until - self.ext.clock.now_us(), 0) / _US
                    await _refuse(send, 503, decided, wait or self.settings.store_retry, [])
                    return
                decision, described = decided
            fields = _decided_fields(described, decision)
            if not decision.allowed:
                await _refuse(send, 429, decision.bound_by, decision.retry_after, fields)
                return

        def send_with_fields(message: Message) -> Awaitable[None]:
            # The app's own send, awaited by the app: no coroutine of ours in between.
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *fields]}
            return send(message)

        await self.app(scope, receive, send_with_fields)

    # -- who and what --------------------------------------------------------------------------

    def _excluded(self, path: str) -> bool:
        return path in self._exclude or path.startswith(self._under)

    def _who(
        self, scope: Scope
    ) -> tuple[_Checked, dict[str, object], tuple[str, str, str | None] | None]:
        """The limits a request is checked against, who it is (the identity), and a key for
        both (tier, API key, agent or None) when the API key and agent are plain strings (a
        subclass may compare equal to a string it is not keyed as, as a ``Fingerprint``
        does); None for those, and for a request charged per client IP."""
        agent = None
        if self._both is not None:
            key, agent = self._both(scope)
        else:
            key = self._key_header(scope)
        if not key:
            client = scope.get("client")
            host = _network(str(client[0])) if client else "unknown"
            # A fingerprint under a dimension of its own: no API key can name these buckets.
            tag = Fingerprint(self.ext.keyspace.fingerprint("client_ip", host))
            return self._ip, {"api_key": tag, "tier": DEFAULT_TIER}, None
        identity: dict[str, object] = {"api_key": key}
        if self._agent_header is not None:
            if self._both is None:
                agent = self._agent_header(scope)
            if agent:
                identity["agent_id"] = agent
            else:
                agent = None
        plain = type(key) is str and (agent is None or type(agent) is str)
        if self.settings.tier_resolver is None:
            identity["tier"] = DEFAULT_TIER
            return self._default, identity, (DEFAULT_TIER, key, agent) if plain else None
        tier = self.ext.gate.tier_of(identity)
        identity["tier"] = tier
        return self._tiers.get(tier, self._default), identity, (tier, key, agent) if plain else None

    def _send(
        self,
        limits: Sequence[Limit],
        identity: Mapping[str, object],
        memo: tuple[str, str, str | None] | None,
        cost: Cost,
    ) -> tuple[Prepared, Awaitable[Any]] | None:
        """:meth:`AsyncStore.send <throttle.store.aio.AsyncStore.send>` the request's
        admission. An API key (and agent) that comes again has its admission as the store
        packed it kept under ``memo``, and filled in with a nonce each time: a few
        microseconds less of work on every request, where the store would look its plan up
        and assemble it each time."""
        packs = self._packed
        if packs is not None and memo is not None:
            packed = packs.get(memo)
            if packed is None:  # (found once the store has packed one admission of it)
                packed = self._store.store.pack(
                    limits, identity, cost=cost, adaptive=self._adaptive, peek=self._peek
                )
                if packed is not None:
                    if len(packs) >= _PACKED:
                        packs.clear()
                    packs[memo] = packed
            if packed is not None:
                return self._store.send_packed(packed)
        return self._store.send(
            limits, identity, cost=cost, adaptive=self._adaptive, peek=self._peek
        )

    # -- the decision --------------------------------------------------------------------------

    def _store_failed(self, exc: StoreError) -> None:
        """The store failed a check: while it does not answer, it is left alone for
        ``throttle_store_retry`` seconds and ``on_store_error`` applies."""
        if isinstance(exc, StoreUnavailable):
            logger.warning("throttle store unavailable (%s); on_store_error applies", exc)
            retry = round(self.settings.store_retry * _US)
            self._down_until = self.ext.clock.now_us() + retry
        else:
            logger.error("throttle store error (%r); on_store_error applies", exc)

    def _fallback(
        self, checked: _Checked, identity: Mapping[str, object], cost: Cost
    ) -> tuple[Decision, _Limits] | str | None:
        """While the store is away: the local limits' decision and the limits it is about, or
        the name of the closed limit that refuses (a str), or None (open)."""
        if checked.closed is not None:
            return checked.closed
        local = checked.local
        if not local.limits:
            return None
        if not isinstance(cost, int | float):
            cost = {n: c for n, c in cost.items() if n in local.by_name}
        # Charged in either mode: a check-only door that peeked at buckets nothing else
        # charges while Redis is away would refuse nothing.
        return self._local.admit(local.limits, identity, cost=cost), local


@functools.lru_cache(maxsize=4096)
def _network(host: str) -> str:
    """Whom a client address stands for: an IPv4 address itself, an IPv6 address's /64 (one
    subscriber's usual allocation: keyed by the address, a client could take a new one for
    each call), anything else (a Unix socket's path) as it is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # an IPv4 client on a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


# -- the answer ----------------------------------------------------------------------------------


def _limits(limits: Sequence[Limit]) -> _Limits:
    policy = ", ".join(_policy_item(limit) for limit in limits).encode()
    quotas = tuple((limit.name, limit.burst, _number(limit.burst).encode()) for limit in limits)
    quoted = [limit.name.replace("%", "%%") for limit in limits]  # (names have none)
    ratelimit = ", ".join(f'"{name}";r=%d;t=%d' for name in quoted).encode()
    return _Limits(
        tuple(limits), {limit.name: limit for limit in limits}, policy, quotas, ratelimit
    )


def _fields(
    limits: _Limits, values: Sequence[float], first: int, scale: float, bound: str | None
) -> list[tuple[bytes, bytes]]:
    """The rate-limit header fields of an answer about ``limits``, whose states ``values``
    holds in their order from index ``first``, two each: the units remaining and the seconds
    until the bucket is full again, times ``scale`` (the script's short reply counts
    millionths). The X-RateLimit fields describe ``bound`` (the limit that denied), else the
    limit with the least room left for its size. (On every request: kept lean.)"""
    numbers: list[int] = []
    shown = None
    room = math.inf
    j = first
    for name, burst, quota in limits.quotas:
        remaining = values[j] / scale
        left = int(remaining + 1e-9) if remaining > 0 else 0  # whole units, never below 0
        reset = _ceil(values[j + 1] / scale)
        j += 2
        numbers += (left, reset)
        if bound is None:
            share = remaining / burst
            if share < room:
                room, shown = share, (quota, left, reset)
        elif name == bound:
            room, shown = -math.inf, (quota, left, reset)
    if shown is None:  # (a bound limit that is not among them: nothing to describe)
        return [(b"ratelimit-policy", limits.policy)]
    return [
        (b"x-ratelimit-limit", shown[0]),
        (b"x-ratelimit-remaining", b"%d" % shown[1]),
        (b"x-ratelimit-reset", b"%d" % shown[2]),
        (b"ratelimit", limits.ratelimit % tuple(numbers)),
        (b"ratelimit-policy", limits.policy),
    ]


def _short_fields(limits: _Limits, reply: Sequence[Any]) -> list[tuple[bytes, bytes]]:
    """:func:`_fields` of an admission's short reply (see
    :func:`~throttle.store.base.short_reply`), whose limits are in ``limits``' order."""
    try:
        return _fields(limits, reply, 1, _US, None)
    except (TypeError, ValueError, OverflowError) as exc:  # numbers the script never gives
        raise StoreError(f"unexpected reply from the admission script: {reply!r}") from exc


def _decided_fields(limits: _Limits, decision: Decision) -> list[tuple[bytes, bytes]]:
    """:func:`_fields` of a decision. Its states may come in another order, and some may be
    missing: a Redis Cluster's admission runs slot by slot, and stops at the first that
    denies. The limits it has states for are described, in ``limits``' order."""
    states = {state.name: state for state in decision.limits}
    values: list[float] = []
    for name, *_ in limits.quotas:
        state = states.get(name)
        if state is not None:
            values += (state.remaining, state.reset_after)
    if len(values) < 2 * len(limits.quotas):
        if not values:  # no state (a stale copy): nothing to describe
            return [(b"ratelimit-policy", limits.policy)]
        present = [limit for limit in limits.limits if limit.name in states]
        limits = _limits(present)._replace(policy=limits.policy)
    return _fields(limits, values, 0, 1, decision.bound_by)


def _policy_item(limit: Limit) -> str:
    """One limit as an IETF quota policy: its burst (q) and the seconds it takes to refill
    all of it (w); ``qu`` names the unit when it is not requests."""
    window = math.ceil(limit.burst / limit.rate.per_second - 1e-9)
    item = f'"{limit.name}";q={_number(limit.burst)};w={max(1, window)}'
    if limit.unit != "requests":
        item += f';qu="{limit.unit}"'
    return item


def _number(value: float) -> str:
    """A quota as the fields take it: an integer (a fractional burst, such as one process's
    share of a limit, is rounded down, but never below 1)."""
    return str(max(1, math.floor(value + 1e-9)))


async def _refuse(
    send: Send,
    status: int,
    limit: str | None,
    retry_after: float,
    fields: list[tuple[bytes, bytes]],
) -> None:
    """A 429 (or a 503 while a closed limit's store is away) with a JSON body."""
    wait = max(1, math.ceil(retry_after - 1e-9))
    if status == 429:
        error = "rate_limited"
        message = f"rate limit {limit} exceeded; retry after {retry_after:.3f} s"
    else:
        error = "unavailable"
        message = f"rate limit {limit} cannot be checked now; retry after {retry_after:.3f} s"
    body = json.dumps(
        {
            "error": error,
            "message": message,
            # Rounded up: a client that comes back after this is never early.
            "retry_after": math.ceil(retry_after * _US) / _US,
            "limit": limit,
        }
    ).encode()
    headers = [
        _JSON,
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(wait).encode()),
        *fields,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- arguments -------------------------------------------------------------------------------------


def _names(
    argument: str, names: object, settings: ThrottleSettings, empty: bool = False
) -> tuple[str, ...]:
    known = settings.limit_names
    accepted = "a list of names from throttle_limits: " + (", ".join(sorted(known)) or "(none)")
    if isinstance(names, str) or not isinstance(names, Sequence):
        problem = f"must be a list of limit names, got {names!r}"
        raise ConfigurationError(argument, problem, accepted)
    if not names and not empty:
        raise ConfigurationError(argument, "names no limit", accepted)
    for name in names:
        if name not in known:
            raise ConfigurationError(argument, f"unknown limit {name!r}", accepted)
    if len(set(names)) != len(names):
        raise ConfigurationError(argument, "names a limit twice", accepted)
    return tuple(names)


def _header_source(argument: str, source: object) -> Callable[[Scope], str | None]:
    """A function that finds a header's value in a scope (None when absent)."""
    if callable(source):
        user: Callable[[Scope], str | None] = source

        def call(scope: Scope) -> str | None:
            value = user(scope)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    argument, f"the callable returned {type(value).__name__}", "a str or None"
                )
            return value

        return call
    token = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
    if not isinstance(source, str) or not source or set(source.lower()) - set(token):
        raise ConfigurationError(
            argument, f"not a header name: {source!r}", "a header name, or a callable(scope)"
        )
    wanted = source.lower().encode()

    def find(scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == wanted:
                return bytes(value).decode("latin-1")
        return None

    return find


def _both_headers(
    key_source: object, agent_source: object
) -> Callable[[Scope], tuple[str | None, str | None]] | None:
    """When the API key and the agent both come from headers (names that
    :func:`_header_source` accepted), a function that finds both in one pass over the
    request's headers (the first of each, as it does); else None."""
    if not isinstance(key_source, str) or not isinstance(agent_source, str):
        return None
    key_name, agent_name = key_source.lower().encode(), agent_source.lower().encode()
    if key_name == agent_name:
        return None

    def find(scope: Scope) -> tuple[str | None, str | None]:
        key = agent = None
        for name, value in scope.get("headers", ()):
            if name == key_name:
                if key is None:
                    key = bytes(value).decode("latin-1")
                    if agent is not None:
                        break
            elif name == agent_name and agent is None:
                agent = bytes(value).decode("latin-1")
                if key is not None:
                    break
        return key, agent

    return find


def _paths(paths: object) -> tuple[str, ...]:
    if isinstance(paths, str) or not isinstance(paths, Iterable):
        raise ConfigurationError(
            "exclude_paths", f"must be a list of paths, got {paths!r}", "paths such as '/healthz'"
        )
    found = []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(
                "exclude_paths", f"not a path: {path!r}", "paths starting with '/'"
            )
        found.append(path.rstrip("/") or "/")
    return tuple(found)


def _part(cost: Cost, checked: _Checked) -> Cost:
    """The part of a cost mapping that names ``checked``'s limits (a tier may lack one, or
    hold it in shadow mode; the per-IP limits may be others)."""
    if isinstance(cost, Mapping):
        return {n: c for n, c in cost.items() if n in checked.shared.by_name}
    return cost


def _cost_source(cost: object, sets: Sequence[_Checked]) -> Callable[[Scope], Cost] | None:
    """The callable giving a request's cost, or None for a fixed cost, which is checked now
    against every limit it may meet."""
    if callable(cost):
        user: Callable[[Scope], Cost] = cost
        return user
    try:
        if isinstance(cost, Mapping):
            named = set().union(*(c.shared.by_name for c in sets))
            for name, value in cost.items():
                if name not in named:
                    raise ConfigurationError(
                        "cost", f"names limit {name!r}, which is not checked here"
                    )
                for checked in sets:
                    for limits in (checked.shared, checked.local):
                        if name in limits.by_name:
                            check_cost(limits.by_name[name], value)
        else:
            for checked in sets:
                for limit in (*checked.shared.limits, *checked.local.limits):
                    check_cost(limit, cost)
    except CostError as exc:
        raise ConfigurationError(
            "cost", str(exc), "a number >= 0, a mapping of limit name to one, or a callable(scope)"
        ) from exc
    return None
