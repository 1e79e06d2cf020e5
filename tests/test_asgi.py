# SPDX-License-Identifier: MIT
"""The ASGI middleware, served by a real uvicorn on loopback and called with httpx: the rate
headers, 429 bodies, tiers, the per-IP fallback, exclusions, check-only mode, outages and
50 concurrent clients.

Limits here refill far slower than a test runs (per hour), so every count is exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import throttle
from tests.conftest import SECRET, TIMEOUT, make_app
from tests.redis_servers import RedisServer
from throttle import Keyspace, Limit, MemoryStore, RedisStore
from throttle.asgi import ThrottleMiddleware, _decided_fields, _limits, _network, _short_fields
from throttle.client import Backoff, arequest, request
from throttle.errors import ConfigurationError, StoreError
from throttle.identity import Fingerprint
from throttle.store import Decision, LimitState, Outcome
from throttle.store.aio import AsyncStore
from throttle.store.base import short_reply
from throttle.testing import ManualClock

pytestmark = pytest.mark.usefixtures("redis_client")  # every db emptied before each test

KEY = "sk-edge-0123456789abcdef"


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    started = threading.Event()
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets)
        started.set()

    server.startup = startup  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert started.wait(TIMEOUT), "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


async def _hello(request: Any) -> JSONResponse:
    return JSONResponse({"ok": True})


def starlette_app() -> Starlette:
    paths = ["/", "/enqueue", "/healthz", "/healthz/deep", "/healthzX", "/docs"]
    return Starlette(routes=[Route(p, _hello, methods=["GET", "POST"]) for p in paths])


LIMITS = {
    "requests": {"rate": "5/h"},
    "tokens": {"rate": "1000/h", "unit": "tokens"},
}


#: Per API key and per agent within it, with a "gold" tier for the API key "gold".
TIERED: dict[str, Any] = {
    "throttle_limits": {
        "requests": {"rate": "5/h"},
        "per_agent": {"rate": "2/h", "per": ["api_key", "agent_id"]},
    },
    "throttle_tiers": {"gold": {"requests": {"rate": "8/h"}}},
    "throttle_tier_resolver": lambda ident: "gold" if ident["api_key"] == "gold" else None,
}


def celery_app(server: RedisServer, **conf: Any) -> Any:
    conf.setdefault("throttle_limits", LIMITS)
    return make_app(server, **conf)


def edge(server: RedisServer, conf: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A Starlette app behind the middleware, for the limits in ``conf``."""
    app = starlette_app()
    kwargs.setdefault("limits", ["requests"])
    app.add_middleware(ThrottleMiddleware, celery_app=celery_app(server, **(conf or {})), **kwargs)
    return app


def store_for(server: RedisServer) -> RedisStore:
    return RedisStore(server.client(), Keyspace(SECRET))


def limit(name: str) -> Limit:
    spec = dict(LIMITS[name])
    return Limit(name, spec.pop("rate"), **spec)


# -- headers and answers ------------------------------------------------------------------------


def test_answers_carry_rate_headers(redis_server: RedisServer) -> None:
    """Each admitted answer says the tightest limit's size, what is left and when it is full
    again, and every limit as IETF RateLimit and RateLimit-Policy items."""
    app = edge(redis_server, limits=["requests", "tokens"], cost={"requests": 1, "tokens": 100})
    with serve(app) as url, httpx.Client(base_url=url) as client:
        answers = [client.get("/", headers={"X-API-Key": KEY}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    last = answers[-1].headers
    assert last["x-ratelimit-limit"] == "5"
    assert last["x-ratelimit-remaining"] == "2"
    # 3 of 5 spent at 5/h: full again in 3 x 720 s.
    assert 2159 <= int(last["x-ratelimit-reset"]) <= 2160
    items = [item.strip() for item in last["ratelimit"].split(",")]
    assert items[0].startswith('"requests";r=2;t=')
    assert items[1].startswith('"tokens";r=700;t=')
    assert last["ratelimit-policy"] == '"requests";q=5;w=3600, "tokens";q=1000;w=3600;qu="tokens"'
    assert answers[-1].json() == {"ok": True}


def test_fields_read_off_the_short_reply_are_those_of_its_decision(
    redis_server: RedisServer,
) -> None:
    """An admitted request's fields are read straight off the script's reply; they are the
    ones its decision gives, whichever limit is the tightest and in whatever order the limits
    are asked (and a denial's, from its decision, describe the limit that denied)."""
    store = store_for(redis_server)
    big, small = Limit("big", "100/h"), Limit("small", "5/h", burst=3)
    waiting = AsyncStore(store, timeout=5)

    async def run() -> list[tuple[list[Any], list[Any] | None]]:
        seen: list[tuple[list[Any], list[Any] | None]] = []
        await waiting.admit([big], {"api_key": "warm"})  # connects
        both, one = {"big": 30, "small": 1}, {"big": 30, "small": 0}
        for limits, cost in (
            ([big, small], both),
            ([small, big], one),
            ([big, small], one),
            ([small, big], both),
        ):
            described = _limits(limits)
            sent = waiting.send(limits, {"api_key": "fields"}, cost=cost)
            assert sent is not None
            prepared, reply = sent[0], await asyncio.wait_for(sent[1], 30)
            decided = _decided_fields(described, store.finish(prepared, reply))
            is_short = short_reply(reply, len(limits))
            short = _short_fields(described, reply) if is_short else None
            seen.append((decided, short))
        await waiting.aclose()
        return seen

    seen = asyncio.run(run())
    assert [short is not None for _, short in seen] == [True, True, True, False]
    for decided, short in seen[:3]:
        assert short == decided
    shown = [(dict(d)[b"x-ratelimit-limit"], dict(d)[b"x-ratelimit-remaining"]) for d, _ in seen]
    # big: 70, 40, 10 left of 100; small: 2 of 3 left, then untouched. The last asks 30 of big's
    # 10: big denies, and is the limit described.
    assert shown == [(b"3", b"2"), (b"100", b"40"), (b"100", b"10"), (b"100", b"10")]
    assert dict(seen[2][0])[b"ratelimit"].startswith(b'"big";r=10;t=')
    assert b'"small";r=2;t=' in dict(seen[1][0])[b"ratelimit"]


def test_a_decision_describes_the_limits_it_has_states_for_in_their_order() -> None:
    """A decision's states may come in another order, or only some of them (a Redis
    Cluster's admission runs slot by slot and stops at the first that denies): the fields
    describe the limits it has states for, in the order they are set, the limit that denied
    in the X-RateLimit ones, and the whole policy; a tie goes to the first limit."""
    big, small, other = Limit("big", "100/h"), Limit("small", "5/h"), Limit("other", "10/h")
    described = _limits([big, small, other])
    full = _limits([big, small])

    def decision(*states: LimitState, bound: str | None = None) -> Decision:
        outcome = Outcome.ADMITTED if bound is None else Outcome.DENIED
        return Decision(outcome, 0.0 if bound is None else 60.0, bound, states)

    reordered = decision(LimitState("small", 1.5, 1800.2, 0), LimitState("big", 40, 2160, 0))
    assert dict(_decided_fields(full, reordered)) == {
        b"x-ratelimit-limit": b"5",
        b"x-ratelimit-remaining": b"1",
        b"x-ratelimit-reset": b"1801",
        b"ratelimit": b'"big";r=40;t=2160, "small";r=1;t=1801',
        b"ratelimit-policy": full.policy,
    }
    partial = decision(LimitState("small", 0.4, 3312, 648), bound="small")
    assert dict(_decided_fields(described, partial)) == {
        b"x-ratelimit-limit": b"5",
        b"x-ratelimit-remaining": b"0",
        b"x-ratelimit-reset": b"3312",
        b"ratelimit": b'"small";r=0;t=3312',
        b"ratelimit-policy": described.policy,
    }
    tied = decision(LimitState("big", 50, 1800, 0), LimitState("other", 5, 1800, 0))
    assert dict(_decided_fields(described, tied))[b"x-ratelimit-limit"] == b"100"
    stale = Decision(Outcome.STALE, 0.0, None, ())
    assert _decided_fields(described, stale) == [(b"ratelimit-policy", described.policy)]


def test_a_short_reply_the_script_never_gives_is_a_store_error() -> None:
    """Numbers the admission script never answers are a StoreError (on_store_error applies),
    not the app's 500; a reply of the wrong length is not read as a short one."""
    described = _limits([Limit("big", "100/h")])
    assert not short_reply([b"admitted", 1, 2], 1)
    assert short_reply([b"admitted", 1, 2, 3], 1)
    for numbers in ([b"x", 1], [10**400, 1], [1, float("inf")]):
        with pytest.raises(StoreError, match="unexpected reply"):
            _short_fields(described, [b"admitted", *numbers, 3])


def test_an_admitted_request_makes_no_decision(redis_server: RedisServer) -> None:
    """An admitted request's fields come off the script's short reply: the middleware makes
    a decision only for the one that is denied (and for the first, which connects)."""
    app = starlette_app()
    middleware = ThrottleMiddleware(app, celery_app=celery_app(redis_server), limits=["requests"])
    finished = []
    finish = middleware._finish

    def counted(prepared: Any, reply: Any) -> Any:
        finished.append(reply[0])
        return finish(prepared, reply)

    middleware._finish = counted  # type: ignore[method-assign]

    async def run() -> list[int]:
        return [await _status(middleware, {b"x-api-key": KEY}) for _ in range(7)]

    assert asyncio.run(run()) == [200] * 5 + [429] * 2
    assert finished == [b"denied"] * 2  # the first went through admit(): it connected


async def _status(middleware: Any, headers: dict[bytes, str]) -> int:
    """The status of a GET / with ``headers``, through ``middleware`` called in-process."""
    return int((await _answer(middleware, headers))["status"])


async def _answer(middleware: Any, headers: dict[bytes, str]) -> dict[str, Any]:
    """The ``http.response.start`` message of a GET / with ``headers``, through
    ``middleware`` called in-process."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(name, value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 1),
        "query_string": b"",
        "root_path": "",
    }
    await middleware(scope, receive, send)
    return dict(sent[0])


def _counting_packs(middleware: ThrottleMiddleware) -> list[object]:
    """The API keys the middleware asks its store for a packed admission of, from now on."""
    store = middleware._store.store
    asked: list[object] = []
    pack = store.pack

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(args[1]["api_key"])
        return pack(*args, **kwargs)

    store.pack = counted  # type: ignore[method-assign]
    return asked


def test_an_identity_that_comes_again_is_kept_packed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admission of an API key, agent and tier that comes again is kept as the store
    packed it: once it is, later requests of it ask the store for nothing but its run, and
    are charged as exactly. An empty agent header is no agent. At most ``_PACKED`` are kept;
    none for an API key the store keeps no packing for (over 256 characters), for requests
    charged per client IP, nor when the cost is the request's own."""
    middleware = ThrottleMiddleware(
        starlette_app(),
        celery_app=celery_app(redis_server, **TIERED),
        limits=["requests", "per_agent"],
        agent_header="X-Agent-ID",
    )
    asked = _counting_packs(middleware)
    long_key = "k" * 300
    who = [
        {b"x-api-key": KEY, b"x-agent-id": "a"},
        {b"x-api-key": KEY, b"x-agent-id": "b"},
        {b"x-api-key": KEY},
        {b"x-api-key": KEY, b"x-agent-id": ""},
        {b"x-api-key": "gold", b"x-agent-id": "a"},
        {b"x-api-key": long_key},
        {},  # per client IP
    ]

    async def run(rounds: int) -> list[list[int]]:
        return [[await _status(middleware, h) for h in who] for _ in range(rounds)]

    statuses = asyncio.run(run(3))  # packed by the store from the second round on
    asked.clear()
    statuses += asyncio.run(run(2))
    assert set(asked) == {long_key}  # the others were found kept
    # KEY's four (its 5/h shared; 2/h per agent, the anonymous one's shared by the last two):
    assert [row[:4] for row in statuses] == [[200] * 4, [200] + [429] * 3] + [[429] * 4] * 3
    # gold's 8/h is not reached: its agent's 2/h binds, as the anonymous agent's does for
    # the long key and per IP.
    assert [row[4:] for row in statuses] == [[200] * 3] * 2 + [[429] * 3] * 3
    assert set(middleware._packed or ()) == {
        ("default", KEY, "a"),
        ("default", KEY, "b"),
        ("default", KEY, None),
        ("gold", "gold", "a"),
    }
    monkeypatch.setattr(throttle.asgi, "_PACKED", 2)
    assert middleware._packed is not None
    middleware._packed.clear()
    asyncio.run(run(1))  # four identities kept again, at most two at a time
    assert 0 < len(middleware._packed) <= 2

    priced = ThrottleMiddleware(
        starlette_app(), celery_app=celery_app(redis_server), limits=["requests"], cost=lambda s: 1
    )
    assert [asyncio.run(_status(priced, {b"x-api-key": "priced"})) for _ in range(3)] == [200] * 3
    assert priced._packed is None


def test_a_key_that_is_a_subclass_of_str_is_not_kept_for_a_string_it_equals(
    redis_server: RedisServer,
) -> None:
    """A ``Fingerprint`` equals the string it is spelt as, but names other buckets (it is
    used as is, not fingerprinted again): a key kept packed for the string is not used for
    it, and each is charged to its own buckets."""
    spelt = Keyspace(SECRET).fingerprint("api_key", "someone")
    keys = iter([spelt] * 3 + [Fingerprint(spelt)] * 3)
    middleware = ThrottleMiddleware(
        starlette_app(),
        celery_app=celery_app(redis_server),
        limits=["requests"],
        api_key_header=lambda scope: next(keys),
    )

    async def run() -> list[int]:  # (on one loop: its connection opened by the first)
        return [await _status(middleware, {}) for _ in range(6)]

    assert asyncio.run(run()) == [200] * 6  # 5/h each
    assert set(middleware._packed or ()) == {("default", spelt, None)}


def test_a_key_whose_tier_changes_is_checked_against_its_new_tier(
    redis_server: RedisServer,
) -> None:
    """The tier is resolved for each request, and a key kept packed is kept per tier: a key
    moved up to gold (8/h) gets gold's limit at once."""
    tiers: dict[str, str] = {}
    conf = {**TIERED, "throttle_tier_resolver": lambda ident: tiers.get(ident["api_key"])}
    middleware = ThrottleMiddleware(
        starlette_app(), celery_app=celery_app(redis_server, **conf), limits=["requests"]
    )

    async def run(n: int) -> list[int]:
        return [await _status(middleware, {b"x-api-key": KEY}) for _ in range(n)]

    # Three of 5/h spent (kept packed by the third): 2,160 s of its 3,600 s burst.
    assert asyncio.run(run(3)) == [200] * 3
    tiers[KEY] = "gold"
    # Gold's 450 s a request fits three more in the 3,600 s; the default's 720 s, two.
    assert asyncio.run(run(4)) == [200] * 3 + [429]
    assert set(middleware._packed or ()) == {("default", KEY, None), ("gold", KEY, None)}


def test_admissions_kept_packed_follow_the_load_factor(redis_server: RedisServer) -> None:
    """A cluster-wide load factor of 0.5 halves every admission's burst and refill, those
    sent as kept packed too: at 60/h, 30 left at most, and 120 s more until full per
    request."""
    conf = {"throttle_limits": {"requests": {"rate": "60/h"}}}
    middleware = ThrottleMiddleware(
        starlette_app(), celery_app=celery_app(redis_server, **conf), limits=["requests"]
    )
    store_for(redis_server).override_load_factor(0.5)

    async def run() -> list[tuple[int, int]]:
        seen = []
        for _ in range(4):
            fields = dict((await _answer(middleware, {b"x-api-key": KEY}))["headers"])
            seen.append((int(fields[b"x-ratelimit-remaining"]), int(fields[b"x-ratelimit-reset"])))
        return seen

    seen = asyncio.run(run())
    assert [left for left, _ in seen] == [29, 28, 27, 26]
    # (Whole seconds rounded up, less what the test took; without the factor a request
    # would add 60 s, not 120.)
    assert all(120 * k - 30 <= reset <= 120 * k for k, (_, reset) in enumerate(seen, 1)), seen
    assert set(middleware._packed or ()) == {("default", KEY, None)}  # the last two's


def test_denial_is_429_with_exact_body(redis_server: RedisServer) -> None:
    """Past the limit the answer is 429 with Retry-After rounded up to whole seconds and a JSON
    body with the exact wait and the limit's name; the app is not called."""
    app = edge(redis_server)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(5):
            assert client.get("/", headers={"X-API-Key": KEY}).status_code == 200
        denied = client.post("/", headers={"X-API-Key": KEY})
    assert denied.status_code == 429
    body = denied.json()
    assert body["error"] == "rate_limited"
    assert body["limit"] == "requests"
    assert "requests" in body["message"]
    assert 715 < body["retry_after"] <= 720  # the next token at 5/h
    assert denied.headers["retry-after"] == str(math.ceil(body["retry_after"]))
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert denied.headers["content-type"] == "application/json"
    assert '"requests";r=0;' in denied.headers["ratelimit"]


def test_edge_charges_the_tasks_buckets(redis_server: RedisServer) -> None:
    """The edge charges the same bucket a task of the same API key is charged: what it spent
    is gone for the workers too."""
    app = edge(redis_server)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(3):
            client.get("/", headers={"X-API-Key": KEY})
    state = store_for(redis_server).peek([limit("requests")], {"api_key": KEY})
    assert state.limits[0].remaining == pytest.approx(2, abs=0.01)


def test_agents_and_tiers(redis_server: RedisServer) -> None:
    """The agent header keys per-agent limits within the API key; the tier resolver's tier
    gives a key its tier's limits."""
    app = edge(redis_server, TIERED, limits=["requests", "per_agent"], agent_header="X-Agent-ID")
    with serve(app) as url, httpx.Client(base_url=url) as client:

        def get(key: str, agent: str) -> int:
            return client.get("/", headers={"X-API-Key": key, "X-Agent-ID": agent}).status_code

        assert [get(KEY, "a") for _ in range(3)] == [200, 200, 429]
        assert [get(KEY, "b") for _ in range(3)] == [200, 200, 429]
        assert get(KEY, "c") == 200  # the key's 5th
        assert get(KEY, "d") == 429  # the key's own limit now
        gold = [get("gold", f"agent{i}") for i in range(9)]
        assert gold == [200] * 8 + [429]


def test_unauthenticated_calls_are_limited_per_client_ip(redis_server: RedisServer) -> None:
    """Without an API key each client IP has buckets of its own (ip_limits), which no API
    key reaches, even one spelt as that IP."""
    conf = {"throttle_limits": {**LIMITS, "anon": {"rate": "2/h"}}}
    app = edge(redis_server, conf, ip_limits=["anon"])
    with serve(app) as url:
        one = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.1"))
        two = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with one, two:
            assert [one.get("/").status_code for _ in range(3)] == [200, 200, 429]
            assert one.get("/").json()["limit"] == "anon"
            assert [two.get("/").status_code for _ in range(3)] == [200, 200, 429]
            # An API key that reads like the IP is a tenant of its own.
            spelt = one.get("/", headers={"X-API-Key": "127.0.0.1"})
            assert spelt.status_code == 200
            assert spelt.headers["x-ratelimit-remaining"] == "4"
            assert one.get("/", headers={"X-API-Key": ""}).json()["limit"] == "anon"


def test_excluded_paths_pass_unchecked(redis_server: RedisServer) -> None:
    """Excluded paths and the paths under them are neither charged nor given rate headers;
    a path that only starts with the same letters is checked."""
    app = edge(redis_server, exclude_paths=["/healthz", "/docs/"])
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for path in ["/healthz", "/healthz/deep", "/docs"] * 4:
            answer = client.get(path, headers={"X-API-Key": KEY})
            assert answer.status_code == 200
            assert "x-ratelimit-limit" not in answer.headers
        checked = client.get("/healthzX", headers={"X-API-Key": KEY})
    assert checked.headers["x-ratelimit-remaining"] == "4"


def test_check_only_charges_nothing(redis_server: RedisServer) -> None:
    """check_only answers whether the cost fits without charging it, and 429 once the tasks
    have spent the bucket."""
    app = edge(redis_server, mode="check_only")
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(8):
            answer = client.post("/enqueue", headers={"X-API-Key": KEY})
            assert answer.status_code == 200
            assert answer.headers["x-ratelimit-remaining"] == "5"
        store = store_for(redis_server)
        for _ in range(5):
            assert store.admit([limit("requests")], {"api_key": KEY}).allowed
        denied = client.post("/enqueue", headers={"X-API-Key": KEY})
    assert denied.status_code == 429
    assert denied.json()["limit"] == "requests"


def test_fastapi_app(redis_server: RedisServer) -> None:
    """A FastAPI app takes the middleware as any Starlette one does."""
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: int) -> dict[str, int]:
        return {"item": item}

    app.add_middleware(
        ThrottleMiddleware,
        celery_app=celery_app(redis_server),
        limits=["requests"],
        api_key_header=lambda scope: dict(scope["headers"]).get(b"authorization", b"").decode(),
    )
    with serve(app) as url, httpx.Client(base_url=url) as client:
        codes = [
            client.get("/items/1", headers={"Authorization": KEY}).status_code for _ in range(6)
        ]
    assert codes == [200] * 5 + [429]


def test_cost_callable_and_scripts_flushed(redis_server: RedisServer) -> None:
    """A callable cost is asked per request; after SCRIPT FLUSH the middleware loads the
    script again and the request is decided, not failed."""
    app = edge(
        redis_server,
        limits=["tokens"],
        cost=lambda scope: {"tokens": 100 if scope["method"] == "POST" else 10},
    )
    with serve(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/", headers={"X-API-Key": KEY}).headers["x-ratelimit-remaining"] == (
            "990"
        )
        redis_server.client().script_flush()
        answer = client.post("/", headers={"X-API-Key": KEY})
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining"] == "890"
    # Charged in Redis, not in the in-process buckets kept for when Redis does not answer.
    charged = store_for(redis_server).peek([limit("tokens")], {"api_key": KEY})
    assert 889 < charged.limits[0].remaining < 891


# -- concurrency ------------------------------------------------------------------------------


def test_fifty_concurrent_clients_exact(redis_server: RedisServer) -> None:
    """50 clients at once, pipelined on one connection: against one key's burst of 20 exactly
    20 are admitted; over ten keys with different amounts already spent, every answer tells
    its own key's count (a reply handed to another request would show another key's)."""
    conf = {"throttle_limits": {"requests": {"rate": "20/h"}}}
    app = edge(redis_server, conf)
    store = store_for(redis_server)
    requests = Limit("requests", "20/h")
    for n in range(10):  # key n has spent n already
        for _ in range(n):
            assert store.admit([requests], {"api_key": f"key-{n}"}).allowed

    async def run(url: str, keys: list[str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=50)) as c:
            return await asyncio.gather(*(c.get("/", headers={"X-API-Key": k}) for k in keys))

    with serve(app) as url:
        one_key = asyncio.run(run(url, [KEY] * 50))
        many = asyncio.run(run(url, [f"key-{i % 10}" for i in range(50)]))
    assert sorted(a.status_code for a in one_key) == [200] * 20 + [429] * 30
    left = sorted(int(a.headers["x-ratelimit-remaining"]) for a in one_key if a.status_code == 200)
    assert left == list(range(20))  # each admission saw the one before it
    for n in range(10):
        answers = [a for i, a in enumerate(many) if i % 10 == n]
        seen = sorted(int(a.headers["x-ratelimit-remaining"]) for a in answers)
        # 5 calls of key n, after n spent of 20: remaining 20 - n - 1 down to 20 - n - 5.
        assert seen == list(range(20 - n - 5, 20 - n)), (n, seen)
        assert all(a.status_code == 200 for a in answers)


def test_scripts_flushed_under_fifty_concurrent_clients(redis_server: RedisServer) -> None:
    """After SCRIPT FLUSH, 50 requests at once meet the lost script: it is loaded again and
    each is sent again and decided exactly once (none fails, none is charged twice)."""
    conf = {"throttle_limits": {"requests": {"rate": "20/h"}}}
    app = edge(redis_server, conf)

    async def run(url: str, count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=50)) as c:
            return await asyncio.gather(
                *(c.get("/", headers={"X-API-Key": KEY}) for _ in range(count))
            )

    with serve(app) as url:
        assert [a.status_code for a in asyncio.run(run(url, 1))] == [200]  # connected
        redis_server.client().script_flush()
        answers = asyncio.run(run(url, 50))
    assert sorted(a.status_code for a in answers) == [200] * 19 + [429] * 31
    left = sorted(int(a.headers["x-ratelimit-remaining"]) for a in answers if a.status_code == 200)
    assert left == list(range(19))
    # Charged in Redis, not in the in-process buckets kept for when Redis does not answer.
    charged = store_for(redis_server).peek([Limit("requests", "20/h")], {"api_key": KEY})
    assert charged.limits[0].remaining < 1


# -- while Redis is away ----------------------------------------------------------------------


@pytest.fixture
def store_server() -> Iterator[RedisServer]:
    """The throttle store on a server of its own, which the test kills and restarts."""
    with RedisServer() as server:
        yield server


def outage_app(
    redis_server: RedisServer, store_server: RedisServer, mode: str, clock: ManualClock
) -> Any:
    conf = {
        "throttle_redis_url": store_server.url,
        "throttle_limits": {"requests": {"rate": "4/h", "on_store_error": mode}},
        "throttle_store_retry": 5.0,
    }
    app = celery_app(redis_server, **conf)
    throttle.Throttle(app, clock=clock)
    web = starlette_app()
    web.add_middleware(ThrottleMiddleware, celery_app=app, limits=["requests"], processes=2)
    return web


@pytest.mark.parametrize("mode", ["open", "local", "closed"])
def test_store_outage_modes(
    redis_server: RedisServer, store_server: RedisServer, mode: str
) -> None:
    """With the store down, open lets requests through unchecked, local admits this process's
    share (1/processes of the limit), closed answers 503 with Retry-After; once the store is
    back and the retry delay has passed, the shared bucket is in force again."""
    clock = ManualClock()
    app = outage_app(redis_server, store_server, mode, clock)
    with serve(app) as url, httpx.Client(base_url=url) as client:

        def get() -> httpx.Response:
            return client.get("/", headers={"X-API-Key": KEY})

        assert get().status_code == 200  # the shared bucket: 3 of 4 left
        store_server.client().execute_command("SAVE")  # comes back with it
        store_server.kill()
        answers = [get() for _ in range(4)]
        codes = [a.status_code for a in answers]
        if mode == "open":
            assert codes == [200] * 4
            assert "x-ratelimit-limit" not in answers[0].headers
        elif mode == "local":
            assert codes == [200, 200, 429, 429]  # 4/h over 2 processes: 2 here
            assert answers[0].headers["x-ratelimit-limit"] == "2"
        else:
            assert codes == [503] * 4
            assert answers[0].headers["retry-after"] == "5"
            assert answers[0].json()["error"] == "unavailable"
        store_server.start()
        clock.advance(5.0)
        back = [get().status_code for _ in range(4)]
    assert back == [200, 200, 200, 429]  # the shared bucket again: 3 left


def test_store_that_stops_answering(redis_server: RedisServer, store_server: RedisServer) -> None:
    """A store that takes longer than throttle_socket_timeout to answer counts as down: the
    request is decided by on_store_error at once, not left waiting."""
    clock = ManualClock()
    app = outage_app(redis_server, store_server, "closed", clock)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        first = client.get("/", headers={"X-API-Key": KEY})
        assert first.headers["x-ratelimit-remaining"] == "3"
        admin = store_server.client()
        admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        answer = client.get("/", headers={"X-API-Key": KEY})
        assert answer.status_code == 503  # an answer waited for would have been a 200
        assert answer.headers["retry-after"] == "5"
        admin.execute_command("CLIENT", "UNPAUSE")  # answered once the pause is over
        clock.advance(5.0)
        # A new connection: the late reply to the request that timed out is nobody's. Each
        # answer is its own request's (the timed-out one may or may not have run in Redis).
        after = [client.get("/", headers={"X-API-Key": KEY}) for _ in range(2)]
    counts = [int(a.headers["x-ratelimit-remaining"]) for a in after]
    assert counts[0] in (1, 2)
    assert counts[1] == counts[0] - 1


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limits": ["nope"]}, "limits"),
        ({"limits": []}, "limits"),
        ({"limits": "requests"}, "limits"),
        ({"limits": ["requests", "requests"]}, "limits"),
        ({"ip_limits": ["nope"]}, "ip_limits"),
        ({"mode": "charge_all"}, "mode"),
        ({"api_key_header": "X API Key"}, "api_key_header"),
        ({"api_key_header": ""}, "api_key_header"),
        ({"agent_header": 7}, "agent_header"),
        ({"exclude_paths": "/healthz"}, "exclude_paths"),
        ({"exclude_paths": ["healthz"]}, "exclude_paths"),
        ({"cost": 6}, "cost"),
        ({"cost": -1}, "cost"),
        ({"cost": float("nan")}, "cost"),
        ({"cost": {"tokens": 1}}, "cost"),
        ({"cost": "1"}, "cost"),
        ({"processes": 0}, "processes"),
        ({"processes": True}, "processes"),
    ],
)
def test_bad_arguments_rejected_when_built(
    redis_server: RedisServer, kwargs: dict[str, Any], field: str
) -> None:
    """A bad argument raises ConfigurationError naming it when the middleware is built."""
    arguments = {"celery_app": celery_app(redis_server), "limits": ["requests"], **kwargs}
    with pytest.raises(ConfigurationError) as caught:
        ThrottleMiddleware(starlette_app(), **arguments)
    assert caught.value.field == field


def test_no_raw_key_in_redis(redis_server: RedisServer) -> None:
    """The edge writes fingerprints only: no raw API key, agent or IP in any key or value."""
    conf = {
        "throttle_limits": {**LIMITS, "per_agent": {"rate": "9/h", "per": ["api_key", "agent_id"]}}
    }
    app = edge(redis_server, conf, limits=["requests", "per_agent"], agent_header="X-Agent-ID")
    with serve(app) as url, httpx.Client(base_url=url) as client:
        client.get("/", headers={"X-API-Key": KEY, "X-Agent-ID": "agent-secret-name"})
        client.get("/")
    client_ = redis_server.client(decode_responses=True)
    stored = []
    for key in client_.scan_iter(count=1000):
        kind = client_.type(key)
        if kind == "string":
            value: object = client_.get(key)
        elif kind == "hash":
            value = client_.hgetall(key)
        elif kind == "zset":
            value = client_.zrange(key, 0, -1, withscores=True)
        else:
            raise AssertionError(f"{key}: a {kind} the edge does not write")
        stored.append([key, value])
    dump = json.dumps(stored)
    assert "throttle:" in dump
    for secret in (KEY, "agent-secret-name", "127.0.0.1"):
        assert secret not in dump


# -- the client helper against the middleware -------------------------------------------------


def test_client_backs_off_exactly_as_the_edge_says(redis_server: RedisServer) -> None:
    """throttle.client against the middleware: every call ends 200, each wait is at least the
    exact retry_after of the 429 body (not the whole second of Retry-After), and async agents
    sharing one key all get through."""
    # One call per half second: a call that follows another within that is refused.
    conf = {"throttle_limits": {"requests": {"rate": "2/s", "burst": 1}}}
    app = edge(redis_server, conf)
    waits: list[float] = []
    hints: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)  # the client's own backoff, as in production

    backoff = Backoff(max_attempts=20, max_wait=30, base=0.01, cap=0.05)
    with serve(app) as url, httpx.Client(base_url=url) as client:

        def hook(response: httpx.Response) -> None:
            if response.status_code == 429:
                response.read()
                hints.append(response.json()["retry_after"])

        client.event_hooks["response"] = [hook]
        codes = [
            request(
                client, "GET", "/", headers={"X-API-Key": KEY}, backoff=backoff, sleep=sleep
            ).status_code
            for _ in range(3)
        ]

        async def agents() -> list[int]:
            async with httpx.AsyncClient(base_url=url) as aclient:

                async def one() -> int:
                    answer = await arequest(
                        aclient, "POST", "/", headers={"X-API-Key": "other"}, backoff=backoff
                    )
                    return answer.status_code

                return await asyncio.gather(*(one() for _ in range(4)))

        async_codes = asyncio.run(agents())
    assert codes == [200] * 3
    assert async_codes == [200] * 4
    assert len(waits) == len(hints) >= 1
    for wait, hint in zip(waits, hints, strict=True):
        assert hint <= wait < 1  # the exact hint plus jitter, not Retry-After's whole second


@pytest.mark.usefixtures("cluster_client")  # every master emptied
def test_on_redis_cluster_and_in_process(redis_server: RedisServer, redis_cluster: Any) -> None:
    """On Redis Cluster (admissions go through the cluster client, in a thread) and with the
    in-process store, the edge admits exactly the burst; neither store packs admissions to
    keep (see :meth:`BaseStore.pack <throttle.store.BaseStore.pack>`)."""
    cluster = celery_app(
        redis_server, throttle_redis_url=redis_cluster.url, throttle_redis_cluster=True
    )
    local = celery_app(redis_server)
    throttle.Throttle(local, store=MemoryStore(Keyspace(SECRET)))
    for app in (cluster, local):
        web = starlette_app()
        assert ThrottleMiddleware(web, celery_app=app, limits=["requests"])._packed is None
        web.add_middleware(ThrottleMiddleware, celery_app=app, limits=["requests"])
        with serve(web) as url, httpx.Client(base_url=url) as client:
            codes = [client.get("/", headers={"X-API-Key": KEY}).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]


def test_costs_per_limit_set_and_whole_quotas(redis_server: RedisServer) -> None:
    """A cost mapping applies to each set of limits what it names of them (the per-IP limits
    here lack one), and a process's share of a limit is told as a whole quota."""
    conf = {"throttle_limits": {**LIMITS, "anon": {"rate": "10/h", "on_store_error": "local"}}}
    app = edge(
        redis_server,
        conf,
        limits=["requests", "tokens"],
        ip_limits=["anon"],
        cost={"requests": 1, "tokens": 100, "anon": 2},
    )
    with serve(app) as url, httpx.Client(base_url=url) as client:
        keyed = client.get("/", headers={"X-API-Key": KEY})
        anonymous = client.get("/")
    assert keyed.headers["ratelimit"].startswith('"requests";r=4;')
    assert '"tokens";r=900;' in keyed.headers["ratelimit"]
    assert anonymous.headers["ratelimit"].startswith('"anon";r=8;')
    shared = ThrottleMiddleware(
        starlette_app(),
        celery_app=celery_app(redis_server, **conf),
        limits=["anon"],
        processes=3,
    )
    assert shared._tiers["default"].local.quotas[0][2] == b"3"  # 10/3, rounded down


def test_lifespan_and_websockets_pass_through(redis_server: RedisServer) -> None:
    """Lifespan and WebSocket scopes reach the app unchecked, however many there are."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = ThrottleMiddleware(app, celery_app=celery_app(redis_server), limits=["requests"])

    async def nothing() -> Any:
        raise AssertionError("not to be called")

    async def run() -> None:
        await middleware({"type": "lifespan"}, nothing, nothing)
        for _ in range(7):  # more than the burst of 5
            scope = {"type": "websocket", "path": "/ws", "headers": [(b"x-api-key", KEY.encode())]}
            await middleware(scope, nothing, nothing)

    asyncio.run(run())
    assert seen == ["lifespan"] + ["websocket"] * 7


@pytest.mark.parametrize(
    ("host", "stands_for"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("/run/api.sock", "/run/api.sock"),
    ],
)
def test_whom_a_client_address_stands_for(host: str, stands_for: str) -> None:
    """An IPv4 client is its address (also on a dual-stack socket); an IPv6 one is its /64,
    so a client cannot take a fresh bucket with each address of its allocation."""
    assert _network(host) == stands_for


def test_the_edge_benchmarks_apps_answer_as_it_expects(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks/edge.py`` fails a run whose answers are not 200s, or whose throttled (or
    floor) answers lack the rate headers: its apps (``benchmarks/edgeapp.py``, the floor's
    reaching into the store's pipelined connection) answer so against this Redis, the
    throttled ones charging the API key's and its agent's buckets, the floor its own fixed
    tenant's, the enqueuing ones each sending a task to its queue."""
    import importlib
    import sys

    from benchmarks.edge import KINDS

    monkeypatch.setenv("EDGE_REDIS_URL", redis_server.url)
    sys.modules.pop("benchmarks.edgeapp", None)  # (it reads the URL when imported)
    try:
        edgeapp = importlib.import_module("benchmarks.edgeapp")
        # Read when the first request builds a middleware. The benchmark's limits refill in a
        # microsecond, so their buckets' keys go 1 to 11 s after a charge (at the next 10 s
        # step), which on a slow machine came before the last app had answered. At 100/h
        # (never binding here either) a charge keeps its keys for minutes.
        edgeapp._celery.conf.throttle_limits = {
            name: {**spec, "rate": "100/h"} for name, spec in edgeapp.LIMITS.items()
        }
        client = redis_server.client()
        client.flushdb()
        headers = {"X-API-Key": "bench-key-001", "X-Agent-ID": "agent-1"}
        for name, kinds in KINDS.items():
            for kind in kinds:
                with serve(getattr(edgeapp, f"{name}_{kind}")) as base:
                    url = f"{base}/v1/runs"
                    answers = [httpx.get(url, headers=headers, timeout=TIMEOUT) for _ in range(2)]
                for answer in answers:
                    assert answer.status_code == 200, (name, kind, answer.text)
                    assert ("x-ratelimit-remaining" in answer.headers) == (kind != "bare"), kind
        keys = {key.decode() for key in client.keys("*")}
        buckets = {key for key in keys if key.startswith("throttle:")}
        queue = edgeapp.QUEUE
        # (per key and per agent) x (the API key, the floor's tenant)
        assert len(buckets) == 4, keys
        # The rest is the broker's: the enqueuing endpoint's tasks, bare and throttled, in
        # its queue for nobody, and kombu's bindings of that queue.
        assert queue in keys, keys
        assert all(queue in key for key in keys - buckets), keys
        assert client.llen(queue) == 4
    finally:
        sys.modules.pop("benchmarks.edgeapp", None)
