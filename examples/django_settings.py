# SPDX-License-Identifier: MIT
"""The Celery part of a Django project's ``settings.py`` with ``throttle``.

Celery reads Django settings with ``app.config_from_object("django.conf:settings",
namespace="CELERY")``: every Celery setting is spelled in capitals with a ``CELERY_`` prefix, and
throttle's ``throttle_*`` settings become ``CELERY_THROTTLE_*`` (``throttle_limits`` is
``CELERY_THROTTLE_LIMITS``). Settings without the prefix are Django's own and Celery ignores
them. ``examples/django_celery.py`` is the matching ``<project>/celery.py``; it loads this module
the same way, so both run without Django.

``throttle.Throttle(app)`` reads these settings once, when ``celery.py`` calls it, and rejects
an unknown ``CELERY_THROTTLE_*`` name or a bad value there, naming the setting.
"""

from __future__ import annotations

import os

# -- Django's own settings (abridged) ------------------------------------------------------------

DEBUG = False
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "agents"]

# -- Celery --------------------------------------------------------------------------------------

CELERY_BROKER_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("RESULT_BACKEND_URL", "redis://127.0.0.1:6379/1")
CELERY_TASK_DEFAULT_QUEUE = "agents"
# A deferred task waits in a worker's memory on a Redis broker; kombu delivers it again to
# another worker after the visibility timeout, so throttle caps a single countdown at
# CELERY_THROTTLE_MAX_DEFER, which must stay at most half of it.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}

# -- throttle ------------------------------------------------------------------------------------

# Defaults to the broker's Redis; a separate database keeps the buckets apart from the queues.
CELERY_THROTTLE_REDIS_URL = os.environ.get("THROTTLE_REDIS_URL", "redis://127.0.0.1:6379/2")
# The HMAC key of every API key's fingerprint: from the environment or a secrets manager,
# never committed. The fallback is for trying the example only.
CELERY_THROTTLE_KEY_SECRET = os.environ.get(
    "THROTTLE_KEY_SECRET", "example-only secret: never use it"
)
CELERY_THROTTLE_DIMENSIONS = ["model"]
CELERY_THROTTLE_LIMITS = {
    # Every tenant's requests and tokens per minute, shared by all its agents.
    "llm-requests": {"rate": "100/m", "burst": 20, "per": ["api_key"], "upstream": "requests"},
    "llm-tokens": {
        "rate": "200000/m",
        "burst": 40000,
        "unit": "tokens",
        "per": ["api_key"],
        "max_cost": 8192,
    },
    # One agent's share of its tenant, so a runaway agent waits in its own bucket.
    "agent-share": {"rate": "30/m", "burst": 10, "per": ["api_key", "agent_id"]},
    # A global cap per model, whoever calls it: one bucket per model for all tenants.
    "model-cap": {"rate": "3000/m", "burst": 100, "per": ["model"], "on_store_error": "closed"},
}
# Per tier, only what differs from the limits above.
CELERY_THROTTLE_TIERS = {
    "free": {
        "llm-requests": {"rate": "20/m", "burst": 5},
        "llm-tokens": {"rate": "40000/m", "burst": 8192},
    },
    "enterprise": {
        "llm-requests": {"rate": "1000/m", "burst": 100},
        "llm-tokens": {"rate": "2000000/m", "burst": 200000},
        "agent-share": {"rate": "300/m", "burst": 50},
    },
}
# Which tier an identity is in (tenants without a tier get the limits above).
CELERY_THROTTLE_TIER_RESOLVER = "examples.django_celery:tier_of"
CELERY_THROTTLE_MAX_DEFER = 300
CELERY_THROTTLE_MAX_DEFERRALS = 50
