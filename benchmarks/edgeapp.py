# SPDX-License-Identifier: MIT
"""The web apps ``benchmarks/edge.py`` serves with uvicorn, each bare and behind
:class:`throttle.asgi.ThrottleMiddleware` with limits that never bind: a Starlette JSON endpoint
(``starlette_bare``, ``starlette_throttled``), a FastAPI one that validates its query and
answers a pydantic model (``fastapi_bare``, ``fastapi_throttled``), and a Starlette endpoint
that enqueues the agent's run as a Celery task, as the APIs this middleware guards do
(``enqueue_bare``, ``enqueue_throttled``: ``send_task`` to the :data:`QUEUE` list on the same
Redis as broker). The first Starlette endpoint is also served behind the floor of any check
at the door (``starlette_floor``, see :class:`CheckFloor`). The store is the Redis at
``EDGE_REDIS_URL``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from throttle import Throttle
from throttle.asgi import ThrottleMiddleware
from throttle.store.aio import AsyncStore
from throttle.store.base import Prepared

#: Per API key, and per agent within it, as an agent platform would set them; far above what
#: the benchmark sends, so every request is admitted and pays the full check.
LIMITS: dict[str, dict[str, Any]] = {
    "requests": {"rate": "1000000/s"},
    "per_agent": {"rate": "1000000/s", "per": ["api_key", "agent_id"]},
}


#: The broker queue the enqueuing endpoint sends its tasks to (a Redis list nobody consumes:
#: ``edge.py`` names it, and empties it after each round).
QUEUE = os.environ.get("EDGE_QUEUE", "edgebench")


async def answer(request: Request) -> JSONResponse:
    return JSONResponse({"queued": True})


async def enqueue(request: Request) -> JSONResponse:
    # (Blocking the loop for the publish, as task.delay() in an async endpoint does.)
    task = _broker.send_task("agents.run", kwargs={"agent": request.headers.get("x-agent-id")})
    return JSONResponse({"queued": True, "id": task.id})


class Queued(BaseModel):
    queued: bool
    agent: str


def _starlette(endpoint: Any = answer) -> Starlette:
    return Starlette(routes=[Route("/v1/runs", endpoint, methods=["GET", "POST"])])


def _fastapi() -> FastAPI:
    api = FastAPI()

    @api.get("/v1/runs")
    async def runs(agent: str = "default") -> Queued:
        return Queued(queued=True, agent=agent)

    return api


_url = os.environ.get("EDGE_REDIS_URL", "redis://127.0.0.1:6379/0")
#: The enqueuing endpoint's Celery app: one of its own, so that the bare and the throttled
#: endpoint publish alike (the middleware installs throttle's extension, and its publish
#: hooks, on the app it is given).
_broker = Celery("edgebench-api", set_as_current=False)
_broker.conf.update(
    broker_url=_url, broker_connection_retry_on_startup=True, task_default_queue=QUEUE
)
_celery = Celery("edgebench", set_as_current=False)
_celery.conf.update(
    throttle_redis_url=_url,
    throttle_key_secret="benchmark-secret-0123456789abcdef",
    throttle_limits=LIMITS,
)


def _throttled(app: Any) -> Any:
    app.add_middleware(
        ThrottleMiddleware, celery_app=_celery, limits=list(LIMITS), agent_header="X-Agent-ID"
    )
    return app


#: What the floor adds to every answer: the throttled app's five fields, spelt as it spells them.
FLOOR_FIELDS = [
    (b"x-ratelimit-limit", b"1000000"),
    (b"x-ratelimit-remaining", b"999999"),
    (b"x-ratelimit-reset", b"1"),
    (b"ratelimit", b'"requests";r=999999;t=1, "per_agent";r=999999;t=1'),
    (b"ratelimit-policy", b'"requests";q=1000000;w=1, "per_agent";q=1000000;w=1'),
]


class CheckFloor:
    """The least a check at the door that asks Redis costs a request here: the throttled
    app's admission, packed once for one API key and agent and sent as it is for every
    request on the same pipelined connection as the middleware's, its reply awaited and not
    read, and fixed rate-limit header fields added. Nothing of who asks, no packing, no
    decision: what the middleware costs beyond this is its own work."""

    def __init__(self, app: Any) -> None:
        self.app = app
        ext = getattr(_celery, "_throttle_extension", None) or Throttle(_celery)
        self.store = AsyncStore(ext.store())
        limits = [ext.settings.policy(name).limit for name in LIMITS]
        identity = {"api_key": "floor", "agent_id": "floor", "tier": "default"}
        prepared = self.store.store._prepare(
            limits, identity, 1, False, None, None, None, False, None, False
        )
        if not isinstance(prepared, Prepared) or prepared.frame is None:
            raise RuntimeError("the floor needs an admission packed whole: one Redis server")
        self.prepared = prepared

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pipe = self.store._pipe_for(self.store.store)
        if pipe is None:
            raise RuntimeError("the floor needs a pipelined connection: one Redis server")
        if pipe.fd is None:
            await pipe.call(self.prepared)  # connects
        else:
            await pipe.submit(self.prepared)

        def send_with_fields(message: Any) -> Any:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *FLOOR_FIELDS]}
            return send(message)

        await self.app(scope, receive, send_with_fields)


def _floor(app: Any) -> Any:
    app.add_middleware(CheckFloor)
    return app


starlette_bare = _starlette()
starlette_throttled = _throttled(_starlette())
starlette_floor = _floor(_starlette())
fastapi_bare = _fastapi()
fastapi_throttled = _throttled(_fastapi())
enqueue_bare = _starlette(enqueue)
enqueue_throttled = _throttled(_starlette(enqueue))
