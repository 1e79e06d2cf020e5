# SPDX-License-Identifier: MIT
"""Agent work for the platform: ``python -m examples.agents.producer [--duration 120]``.

Three tenants (``examples/agents/tenants.py``) run several agents each; every agent works in
sessions, a few tool calls at once, at its own pace, until 85% of the duration has passed.
Some time in, one agent of ``acme`` runs away: it loops a thousand tool calls as fast as it
can. The plan is drawn from ``--seed``, so runs are comparable.

Before it sends a task the producer records its id with its tenant's label and agent
(``keys("tasks")``), so that whoever watches the task events can tell whose work it is
without any API key in them. SIGINT or SIGTERM stop it between two sends.
"""

from __future__ import annotations

import argparse
import random
import signal
import time
import uuid
from dataclasses import dataclass
from types import FrameType
from typing import Any

import redis

from examples.agents.app import REDIS_URL, app, keys, tool_call

#: Agents per tenant and the tool calls per second each asks for on average.
AGENTS: dict[str, dict[str, float]] = {
    "acme": {"planner": 0.15, "researcher": 0.15, "coder": 0.15},
    "globex": {"triage": 0.7, "writer": 0.7, "reviewer": 0.7, "search": 0.7},
    "initech": {"ops": 1.6, "billing": 1.6, "support": 1.6},
}
RUNAWAY = ("acme", "looper")
RUNAWAY_CALLS = 1000
RUNAWAY_AT = 0.15  # of the duration, and at least
RUNAWAY_AFTER = 5.0  # seconds
#: Tool calls per session (acme's agents are the quiet ones).
SESSIONS: dict[str, tuple[int, int]] = {"acme": (2, 5), "globex": (3, 8), "initech": (3, 8)}
ACTIVE = 0.85  # of the duration: agents start no session after this
START_WITHIN = 0.08  # of the duration: each agent's first session starts by then
WORDS = ("plan", "search", "read", "summarise", "compare", "draft", "check", "fix", "test", "cite")


@dataclass(frozen=True)
class Call:
    at: float  # seconds after the start
    tenant: str
    agent: str
    step: int
    prompt: str
    max_tokens: int


def plan(duration: float, seed: int = 7, runaway_calls: int = RUNAWAY_CALLS) -> list[Call]:
    """Every tool call of the run, in the order they are sent."""
    rng = random.Random(seed)
    calls: list[Call] = []
    for tenant, agents in AGENTS.items():
        for agent, rate in agents.items():
            t, step = rng.uniform(0, START_WITHIN * duration), 0
            while t < ACTIVE * duration:
                size = rng.randint(*SESSIONS[tenant])
                for _ in range(size):
                    calls.append(_call(rng, t, tenant, agent, step))
                    step += 1
                t += rng.expovariate(rate / size)
    tenant, agent = RUNAWAY
    at = max(RUNAWAY_AT * duration, RUNAWAY_AFTER)
    calls += [_call(rng, at, tenant, agent, step) for step in range(runaway_calls)]
    calls.sort(key=lambda c: c.at)
    return calls


def _call(rng: random.Random, at: float, tenant: str, agent: str, step: int) -> Call:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 300)))
    return Call(at, tenant, agent, step, f"{agent}, step {step}: {words}", rng.choice([256, 512]))


class Producer:
    """Sends a plan's calls on time and records whose each one is."""

    def __init__(self, records: redis.Redis) -> None:
        self.records = records
        self.stopping = False
        self.sent = 0

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stopping = True

    def run(self, calls: list[Call]) -> int:
        """Send every call at its time (or until stopped); return how many were sent."""
        start = time.monotonic()
        self.records.hset(keys("producer"), mapping={"started": time.time(), "calls": len(calls)})
        i = 0
        with app.producer_or_acquire() as producer:
            while i < len(calls) and not self.stopping:
                elapsed = time.monotonic() - start
                if calls[i].at > elapsed:
                    # Pacing the plan, not synchronisation; stop() is seen within 0.2 s.
                    time.sleep(min(calls[i].at - elapsed, 0.2))
                    continue
                due = i
                while due < len(calls) and calls[due].at <= elapsed:
                    due += 1
                self._send(calls[i:due], producer)
                i = due
        self.records.hset(keys("producer"), "sent", str(self.sent))
        return self.sent

    def _send(self, due: list[Call], producer: Any) -> None:
        ids = [str(uuid.uuid4()) for _ in due]
        now = time.time()
        with self.records.pipeline(transaction=False) as pipe:
            for task_id, call in zip(ids, due, strict=True):
                pipe.hset(keys("tasks"), task_id, f"{call.tenant} {call.agent} {now:.3f}")
                pipe.hincrby(keys("enqueued"), f"{call.tenant} {call.agent}", 1)
            pipe.execute()
        for task_id, call in zip(ids, due, strict=True):
            tool_call.apply_async(
                kwargs={
                    "tenant": call.tenant,
                    "agent_id": call.agent,
                    "step": call.step,
                    "prompt": call.prompt,
                    "max_tokens": call.max_tokens,
                },
                task_id=task_id,
                producer=producer,
            )
            self.sent += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runaway-calls", type=int, default=RUNAWAY_CALLS)
    args = parser.parse_args(argv)
    calls = plan(args.duration, args.seed, args.runaway_calls)
    records = redis.Redis.from_url(REDIS_URL)
    producer = Producer(records)
    signal.signal(signal.SIGINT, producer.stop)
    signal.signal(signal.SIGTERM, producer.stop)
    print(
        f"producer: {len(calls)} tool calls over {args.duration:g} s "
        f"({args.runaway_calls} from the runaway agent {'/'.join(RUNAWAY)})",
        flush=True,
    )
    sent = producer.run(calls)
    print(f"producer: sent {sent} of {len(calls)}", flush=True)


if __name__ == "__main__":
    main()
