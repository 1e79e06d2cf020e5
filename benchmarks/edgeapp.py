# SPDX-License-Identifier: MIT
"""The web app ``benchmarks/edge.py`` serves with uvicorn: one Starlette JSON endpoint, bare
(``benchmarks.edgeapp:bare``) and behind :class:`throttle.asgi.ThrottleMiddleware`
(``benchmarks.edgeapp:throttled``) with limits that never bind. The store is the Redis at
``EDGE_REDIS_URL``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
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


def _app() -> Starlette:
    return Starlette(routes=[Route("/v1/runs", enqueue, methods=["GET", "POST"])])


bare = _app()

throttled = _app()
_celery = Celery("edgebench", set_as_current=False)
_celery.conf.update(
    throttle_redis_url=os.environ.get("EDGE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    throttle_key_secret="benchmark-secret-0123456789abcdef",
    throttle_limits=LIMITS,
)
throttled.add_middleware(
    ThrottleMiddleware,
    celery_app=_celery,
    limits=list(LIMITS),
    agent_header="X-Agent-ID",
)
