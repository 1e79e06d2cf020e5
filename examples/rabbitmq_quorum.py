# SPDX-License-Identifier: MIT
"""throttle on RabbitMQ with quorum queues: deferred work waits in the broker, not in workers.

    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672// REDIS_URL=redis://127.0.0.1:6379/0 \\
        celery -A examples.rabbitmq_quorum worker -l INFO

A denied task is re-published with a countdown. On a Redis broker a worker takes such a message
at once and holds it, unacknowledged, in its own memory until the countdown ends. Here the queue
is a quorum queue behind a topic exchange, so Celery uses RabbitMQ's native delayed delivery
(Celery 5.5+): a message with a countdown goes to the ``celery_delayed_27`` exchange with the
delay written into its routing key in binary, waits in a ladder of 28 quorum queues whose TTLs are
1 s, 2 s, 4 s, ... and is dead-lettered through ``celery_delayed_delivery`` back to this queue's
exchange when it is due. What each part needs:

- ``x-queue-type: quorum`` on the queue: a worker that sees it (``worker_detect_quorum_queues``)
  declares the delay ladder and binds the queue to it at start, and uses per-consumer QoS
  (quorum queues refuse the global kind).
- A topic exchange: through a direct exchange Celery only logs a warning, publishes the message
  straight to the queue, and the worker holds the countdown in memory again.
- ``confirm_publish``: throttle acknowledges the old copy only after the broker confirmed the new
  one, so a failure in between leaves a twin (dropped by throttle's deferral token), never a loss.

Two hazards of re-publishing through the ladder, both handled by throttle's deferral:

- It counts whole seconds. Celery routes ``int(countdown)`` through it and the message's ETA
  still says when it is due, so a worker holds at most the last fraction of a second; but a
  countdown under one second cannot be routed at all (kombu raises ``ValueError``). throttle
  publishes such a countdown as one second: a deferred task whose slot is less than a second
  away comes back up to a second late, which its booking allows.
- A copy that came through the ladder carries RabbitMQ's ``x-death`` headers. Re-published with
  them, the next trip that dead-letters it into a ladder queue it passed before (a countdown of
  3 s after one of 1 s, say) is taken for a dead-letter cycle and the message is never delivered
  (RabbitMQ 3.10 keeps it in the ladder queue for good). throttle's copies, like Celery's
  retries, leave these headers behind.

The throttle store is Redis in any case (``throttle_redis_url`` is required when the broker is
not Redis); results go to the same Redis here. Environment: ``RABBITMQ_URL``, ``REDIS_URL``,
``THROTTLE_KEY_SECRET``, ``AGENTS_QUEUE`` (the queue's and its exchange's name, ``agents``) and
``THROTTLE_MAX_DEFER`` (the longest single countdown, 300 s: work booked further ahead checks
in again; RabbitMQ has no visibility timeout to stay under).
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

import throttle

BROKER_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("AGENTS_QUEUE", "agents")
app = Celery("rabbitmq_quorum", broker=BROKER_URL, backend=REDIS_URL)

exchange = Exchange(QUEUE, type="topic", durable=True)
app.conf.update(
    task_queues=[
        Queue(QUEUE, exchange, routing_key=QUEUE, queue_arguments={"x-queue-type": "quorum"}),
    ],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_exchange_type="topic",
    task_default_routing_key=QUEUE,
    task_default_queue_type="quorum",
    worker_detect_quorum_queues=True,  # the default; native delayed delivery depends on it
    broker_native_delayed_delivery_queue_type="quorum",
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    throttle_max_defer=float(os.environ.get("THROTTLE_MAX_DEFER", "300")),
    throttle_redis_url=REDIS_URL,
    throttle_key_secret=os.environ.get("THROTTLE_KEY_SECRET", "example-secret-change-me-please"),
    throttle_limits={
        "llm-requests": {"rate": "120/m", "burst": 5, "per": ["api_key"]},
    },
)
throttle.Throttle(app)


@app.task(throttle=["llm-requests"], name="rabbitmq_quorum.call_model")
def call_model(prompt: str, *, api_key: str, agent_id: str = "agent") -> str:
    """Stand-in for an LLM call: answers with the prompt's first three words."""
    return " ".join(prompt.split()[:3])
