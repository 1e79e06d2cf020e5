# SPDX-License-Identifier: MIT
"""The web apps ``benchmarks/edge.py`` serves with uvicorn, each bare and behind
:class:`throttle.asgi.ThrottleMiddleware` with limits that never bind: a Starlette JSON endpoint
(``starlette_bare``, ``starlette_throttled``) and a FastAPI one that validates its query and
answers a pydantic model (``fastapi_bare``, ``fastapi_throttled``). The store is the Redis at
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

from throttle.asgi import ThrottleMiddleware

#: Per API key, and per agent within it, as an agent platform would set them; far above what
#: the benchmark sends, so every request is admitted and pays the full check.
LIMITS: dict[str, dict[str, Any]] = {
    "requests": {"rate": "1000000/s"},
    "per_agent": {"rate": "1000000/s", "per": ["api_key", "agent_id"]},
}


async def enqueue(request: Request) -> JSONResponse:
    return JSONResponse({"queued": True})


class Queued(BaseModel):
    queued: bool
    agent: str


def _starlette() -> Starlette:
    return Starlette(routes=[Route("/v1/runs", enqueue, methods=["GET", "POST"])])


def _fastapi() -> FastAPI:
    api = FastAPI()

    @api.get("/v1/runs")
    async def runs(agent: str = "default") -> Queued:
        return Queued(queued=True, agent=agent)

    return api


_celery = Celery("edgebench", set_as_current=False)
_celery.conf.update(
    throttle_redis_url=os.environ.get("EDGE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    throttle_key_secret="benchmark-secret-0123456789abcdef",
    throttle_limits=LIMITS,
)


def _throttled(app: Any) -> Any:
    app.add_middleware(
        ThrottleMiddleware, celery_app=_celery, limits=list(LIMITS), agent_header="X-Agent-ID"
    )
    return app


starlette_bare = _starlette()
starlette_throttled = _throttled(_starlette())
fastapi_bare = _fastapi()
fastapi_throttled = _throttled(_fastapi())
