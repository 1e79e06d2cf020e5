# SPDX-License-Identifier: MIT
"""An agent API with the tasks' limits checked at its door, and an agent calling it.

    REDIS_URL=redis://127.0.0.1:6379/0 python examples/edge_api.py

serves the API on a free loopback port for a moment, and an agent calls it through
``throttle.client``: past its key's burst the API answers 429, and the client waits as long as
the answer says (the exact ``retry_after`` of the body, not the whole second of
``Retry-After``), then gets through. Run the API alone with ``uvicorn examples.edge_api:api``.

``/v1/complete`` is the work itself, so the door charges it (``mode="charge"``). An endpoint
that only enqueues a throttled task would use ``mode="check_only"`` instead: the task is
charged when a worker runs it, and the door only refuses what would not fit now.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import uvicorn
from celery import Celery
from fastapi import FastAPI

from throttle.asgi import ThrottleMiddleware
from throttle.client import Backoff, request

celery = Celery("edge_api", set_as_current=False)
celery.conf.update(
    throttle_redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    throttle_key_secret=os.environ.get("THROTTLE_KEY_SECRET", "example-secret-change-me-please"),
    throttle_key_prefix="edge-example",
    throttle_limits={"completions": {"rate": "2/s", "burst": 2}},
)

api = FastAPI()
api.add_middleware(
    ThrottleMiddleware,
    celery_app=celery,
    limits=["completions"],
    exclude_paths=["/healthz"],
)


@api.post("/v1/complete")
async def complete(job: dict[str, str]) -> dict[str, str]:
    return {"answer": f"(simulated) {job['prompt'][::-1]}"}


@api.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


def main() -> None:
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn has no start-up callback for a server run this way
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        for n in range(5):
            answer = request(
                http,
                "POST",
                "/v1/complete",
                json={"prompt": f"step {n}"},
                headers={"X-API-Key": "sk-example-agent"},
                backoff=Backoff(max_attempts=10, base=0.05, cap=0.2),
                sleep=sleep,
            )
            left = answer.headers["x-ratelimit-remaining"]
            print(
                f"call {n}: {answer.status_code} after {len(waits)} 429(s), "
                f"waited {sum(waits):.2f} s; {left} left"
            )
            waits.clear()
    server.should_exit = True
    thread.join()


if __name__ == "__main__":
    main()
