# SPDX-License-Identifier: MIT
"""The admission core without Celery: several limits at once, a booking, and settlement.

REDIS_URL=redis://127.0.0.1:6379/0 python examples/admission_core.py
"""

from __future__ import annotations

import os
import time

import redis

from throttle import Keyspace, Limit, RedisStore

requests_per_key = Limit("llm-requests", "60/m", burst=5)
tokens_per_key = Limit("llm-tokens", "20000/m", burst=20000, unit="tokens", max_cost=4096)
agent_share = Limit("agent-share", "120/m", burst=2, per=["api_key", "agent_id"])
LIMITS = [requests_per_key, tokens_per_key, agent_share]

store = RedisStore(
    redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")),
    Keyspace(os.environ.get("THROTTLE_KEY_SECRET", "example-secret-change-me-please")),
)
identity = {"api_key": "sk-example", "agent_id": "researcher"}

for step in range(4):
    decision = store.admit(LIMITS, identity, cost={"llm-tokens": 1500}, reserve=True, horizon=300)
    if decision.allowed:
        assert decision.receipt is not None
        # ... call the LLM here; then settle the estimate with what it really used:
        store.settle(decision.receipt, {"llm-tokens": 900})
        print(
            f"step {step}: admitted; left:",
            {s.name: round(s.remaining, 1) for s in decision.limits},
        )
        continue
    wait = decision.retry_after
    print(f"step {step}: {decision.outcome} by {decision.bound_by}, slot in {wait:.3f} s")
    time.sleep(decision.retry_after)  # a real caller re-queues the work instead of sleeping
    back = store.admit(LIMITS, identity, cost={"llm-tokens": 1500}, booking=decision.booking)
    print(f"step {step}: came back at its slot: {back.outcome}")
