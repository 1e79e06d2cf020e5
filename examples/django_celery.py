# SPDX-License-Identifier: MIT
"""What a Django project's ``<project>/celery.py`` holds when it uses ``throttle``.

In the project itself::

    import os

    from celery import Celery

    import throttle

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    throttle.Throttle(app)  # reads CELERY_THROTTLE_* once, here
    app.autodiscover_tasks()

This module does the same with ``examples/django_settings.py`` as the settings module, so it
runs without Django: ``celery -A examples.django_celery worker``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery

import throttle

#: Tenants on a tier other than the default, by API key. A real project would look the tenant
#: up (and cache it): the resolver runs for every admission.
TIERS_BY_KEY: dict[str, str] = {"sk-free-tenant": "free", "sk-big-tenant": "enterprise"}


def tier_of(identity: Mapping[str, object]) -> str | None:
    """``CELERY_THROTTLE_TIER_RESOLVER``: the tier of an identity, None for the default."""
    return TIERS_BY_KEY.get(str(identity.get("api_key")))


app = Celery("proj")
app.config_from_object("examples.django_settings", namespace="CELERY")
throttle.Throttle(app)


def estimate_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """Tokens to admit a call at: its prompt (about four characters a token) plus its answer."""
    return len(kwargs["prompt"]) / 4 + kwargs.get("max_tokens", 512)


@app.task(
    throttle=["llm-requests", "llm-tokens", "agent-share", "model-cap"],
    throttle_cost={"llm-tokens": estimate_tokens},
    # The custom dimension "model" is read from the argument of that name.
    throttle_identity={"api_key": "api_key", "agent_id": "agent_id", "model": "model"},
    name="agents.ask_model",
)
def ask_model(
    *, prompt: str, api_key: str, agent_id: str, model: str = "small", max_tokens: int = 512
) -> str:
    """Stand-in for an LLM call; a real one reports its usage with ``throttle.report_usage``."""
    return prompt[:40]
