# SPDX-License-Identifier: MIT
"""The agent platform's Celery app: ``celery -A examples.agents.app worker``.

Configured from the environment: ``REDIS_URL`` (broker, throttle's store and the platform's
records, all under keys starting ``agents:``) and ``PROVIDER_URL`` (the SIMULATED LLM provider's
completions endpoint, ``examples/agents/provider.py``); ``THROTTLE_KEY_SECRET`` replaces the
demo's fixed secret.

Every tool call of an agent is one ``agents.tool_call`` task, admitted against three limits:
its API key's requests per minute and LLM tokens per minute (admitted at an estimate, settled
with the usage the provider reports), and its agent's share of the key (so one runaway agent
waits in its own bucket while its siblings go on). Each tier has its own rates. Adaptive limits
are on: the workers' load, and the provider's 429s, slow a key down for every worker.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import redis
from celery import Celery

import throttle
from examples.agents.tenants import TENANTS, api_key, tier_of_key
from throttle import signals

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PROVIDER_URL = os.environ.get("PROVIDER_URL", "http://127.0.0.1:8400/v1/chat/completions")
#: Every key this app writes on REDIS_URL starts with this (broker, store, records).
PREFIX = "agents"
QUEUE = "agents"
#: The platform's records of what ran (read by the demo's summary): see :func:`keys`.
RECORDS = f"{PREFIX}:records"
RECORD_TTL = 86400

#: The default tier; the others override it per limit. The default tier's key buckets hold a
#: minute's worth, so the agents' short bursts pass at once. A runaway agent's backlog queues in
#: its own agent share: a denial booked in the key's limit is booked in the agent's share too,
#: which then binds the agent's later calls.
LIMITS: dict[str, dict[str, Any]] = {
    "llm-requests": {"rate": "60/m", "burst": 60, "per": ["api_key"]},
    "llm-tokens": {
        "rate": "60000/m",
        "burst": 30000,
        "unit": "tokens",
        "per": ["api_key"],
        "max_cost": 4096,
    },
    "agent-share": {"rate": "18/m", "burst": 3, "per": ["api_key", "agent_id"]},
}
TIERS: dict[str, dict[str, dict[str, Any]]] = {
    "agent": {
        "llm-requests": {"rate": "150/m", "burst": 4},
        "llm-tokens": {"rate": "120000/m", "burst": 12000},
        "agent-share": {"rate": "60/m", "burst": 5},
    },
    "admin": {
        # The admin tier asks for more than the provider gives one key (4/s): its bucket also
        # follows what the provider says remains.
        "llm-requests": {"rate": "300/m", "burst": 10, "upstream": "requests"},
        "llm-tokens": {"rate": "300000/m", "burst": 30000},
        "agent-share": {"rate": "120/m", "burst": 10},
    },
}
#: The workers' load lowers every limit when their pool slots are nearly all busy (host CPU is
#: left out: the demo runs the provider, the producer and its own view on the same machine),
#: and the provider's 429s lower the key that got them.
ADAPTIVE: dict[str, Any] = {"cpu": [], "busy": [[0.9, 0.5], [0.75, 0.75]]}


def keys(name: str) -> str:
    """The key of one of the platform's records: ``runs`` (a list, one JSON entry per task
    body started), ``done`` (a hash, task id -> completions), ``finished`` (a list, one JSON
    entry per completion), ``deferrals`` (a hash, task id -> deferrals), ``reasons`` (a hash,
    reason -> deferrals); and what the producer writes: ``tasks`` (a hash, task id ->
    "tenant agent sent-at"), ``enqueued`` (a hash, "tenant agent" -> tasks sent) and
    ``producer`` (a hash: when it started, how many calls it planned and sent)."""
    return f"{RECORDS}:{name}"


def tier_of(identity: Any) -> str | None:
    """``throttle_tier_resolver``: the tier of the call's API key."""
    return tier_of_key(identity.get("api_key"))


app = Celery("agents", broker=REDIS_URL, set_as_current=False)
app.conf.update(
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    # Task events (as `celery worker -E`): the demo's live view and Flower read them.
    worker_send_task_events=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    throttle_redis_url=REDIS_URL,
    throttle_key_prefix=f"{PREFIX}:throttle",
    throttle_key_secret=os.environ.get("THROTTLE_KEY_SECRET")
    or "demo-only secret: set THROTTLE_KEY_SECRET for anything real",
    throttle_limits=LIMITS,
    throttle_tiers=TIERS,
    throttle_tier_resolver=tier_of,
    throttle_adaptive=ADAPTIVE,
)
throttle.Throttle(app)


class _Process:
    """What one worker process opens after the fork: its HTTP client and its Redis client."""

    pid = 0
    http: httpx.Client
    records: redis.Redis

    @classmethod
    def get(cls) -> type[_Process]:
        if cls.pid != os.getpid():
            cls.http = httpx.Client(timeout=30)
            cls.records = redis.Redis.from_url(REDIS_URL)
            cls.pid = os.getpid()
        return cls


def estimate_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The tokens a call is admitted at: its prompt (about four characters a token) plus the
    most the model may answer. The usage reported afterwards settles the difference."""
    return len(kwargs.get("prompt", "")) / 4 + float(kwargs.get("max_tokens", 512))


def _api_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return api_key(kwargs["tenant"])


@app.task(
    bind=True,
    name="agents.tool_call",
    throttle=["llm-requests", "agent-share", "llm-tokens"],
    throttle_cost={"llm-tokens": estimate_tokens},
    throttle_identity={"api_key": _api_key, "agent_id": "agent_id"},
    max_retries=0,
)
def tool_call(
    self: Any, *, tenant: str, agent_id: str, step: int, prompt: str, max_tokens: int = 512
) -> int:
    """One tool call of an agent: ask the model. A 429 leaves as httpx's HTTPStatusError and
    throttle defers the task by the provider's Retry-After (not a retry: ``max_retries=0``)."""
    local = _Process.get()
    started = time.time()
    local.records.rpush(
        keys("runs"),
        json.dumps({"id": self.request.id, "t": started, "tenant": tenant, "agent": agent_id}),
    )
    answer = local.http.post(
        PROVIDER_URL,
        headers={"authorization": f"Bearer {api_key(tenant)}"},
        json={
            "model": "simulated",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "metadata": {"agent": agent_id, "step": step},
        },
    )
    answer.raise_for_status()
    tokens = int(answer.json()["usage"]["total_tokens"])
    throttle.report_usage({"llm-tokens": tokens})
    throttle.report_upstream(answer.headers)
    finished = {
        "id": self.request.id,
        "t": time.time(),
        "tenant": tenant,
        "agent": agent_id,
        "tokens": tokens,
        "estimate": estimate_tokens((), {"prompt": prompt, "max_tokens": max_tokens}),
    }
    with local.records.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys("done"), self.request.id, 1)
        pipe.rpush(keys("finished"), json.dumps(finished))
        for name in ("runs", "done", "finished"):
            pipe.expire(keys(name), RECORD_TTL)
        pipe.execute()
    return tokens


@signals.task_throttled.connect
def _record_deferral(sender: Any = None, task_id: str = "", **fields: Any) -> None:
    """Count every deferral (the live view reads the ``task-throttled`` events instead)."""
    fields.pop("signal", None)
    with _Process.get().records.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys("deferrals"), task_id, 1)
        pipe.hincrby(keys("reasons"), str(fields.get("reason")), 1)
        pipe.expire(keys("deferrals"), RECORD_TTL)
        pipe.expire(keys("reasons"), RECORD_TTL)
        pipe.execute()


__all__ = ["PROVIDER_URL", "QUEUE", "REDIS_URL", "TENANTS", "app", "keys", "tool_call"]
