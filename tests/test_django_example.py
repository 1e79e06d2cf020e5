# SPDX-License-Identifier: MIT
"""examples/django_settings.py and examples/django_celery.py: Django-style ``CELERY_*`` settings
load into ``throttle.Throttle(app)`` through ``config_from_object(..., namespace="CELERY")`` and
give the limits they spell out, per tier. No Django needed.

Each check runs in a fresh interpreter: ``Throttle(app)`` connects process-wide signal
receivers with the example's own secret, and the example's task is a shared task that Celery
would add to every app this process creates later; neither may leak into the other tests.
"""

from __future__ import annotations

import base64
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from throttle import Limit

ROOT = Path(__file__).resolve().parent.parent
#: The environment variables the settings module reads: unset, so its defaults are checked.
ENV = ("REDIS_URL", "RESULT_BACKEND_URL", "THROTTLE_REDIS_URL", "THROTTLE_KEY_SECRET")
SECRET = "example-only secret: never use it"

PRELUDE = """
import base64, pickle, sys
sys.modules["django"] = None  # nothing here may import Django
from celery import Celery
import throttle


def example_app(**kwargs):
    app = Celery("django-example")
    app.config_from_object("examples.django_settings", namespace="CELERY")
    return app, throttle.Throttle(app, **kwargs)
"""


def run_example(code: str) -> Any:
    """Run ``code`` after the prelude in a fresh interpreter; return the ``result`` it sets."""
    script = f"{PRELUDE}\n{code}\nprint('RESULT', base64.b64encode(pickle.dumps(result)).decode())"
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
    return pickle.loads(base64.b64decode(line.split(" ", 1)[1]))


def expected(tier: str) -> dict[str, Limit]:
    """The limits the example means, written out independently of it."""
    requests, tokens = {
        "default": (("100/m", 20), ("200000/m", 40000)),
        "free": (("20/m", 5), ("40000/m", 8192)),
        "enterprise": (("1000/m", 100), ("2000000/m", 200000)),
    }[tier]
    share = ("300/m", 50) if tier == "enterprise" else ("30/m", 10)
    return {
        "llm-requests": Limit("llm-requests", requests[0], burst=requests[1]),
        "llm-tokens": Limit("llm-tokens", tokens[0], burst=tokens[1], unit="tokens", max_cost=8192),
        "agent-share": Limit("agent-share", share[0], burst=share[1], per=["api_key", "agent_id"]),
        "model-cap": Limit("model-cap", "3000/m", burst=100, per=["model"], dimensions=["model"]),
    }


def test_celery_namespace_settings_reach_celery_and_throttle() -> None:
    """``CELERY_BROKER_URL`` and friends become Celery's settings, ``CELERY_THROTTLE_*`` become
    throttle's: Redis URL, secret, dimensions, deferral caps and the tier resolver."""
    got = run_example(
        "app, ext = example_app()\n"
        "s, c = ext.settings, app.conf\n"
        "result = {\n"
        "    'celery': [c.broker_url, c.result_backend, c.task_default_queue],\n"
        "    'throttle': [s.redis_url, s.key_secret, s.dimensions, s.max_defer, s.max_deferrals],\n"
        "    'tiers': [s.tier_resolver({'api_key': k}) for k in ('sk-free-tenant', 'sk-other')],\n"
        "}\n"
    )
    assert got == {
        "celery": ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1", "agents"],
        "throttle": ["redis://127.0.0.1:6379/2", SECRET.encode(), ("model",), 300.0, 50],
        "tiers": ["free", None],
    }


def test_each_tier_gets_the_intended_limits() -> None:
    """Every tier holds every limit: the default ones, with the tier's overrides applied; the
    per-limit options (upstream, on_store_error) come through."""
    got = run_example(
        "app, ext = example_app()\n"
        "result = {\n"
        "    tier: {n: (p.limit, p.upstream, p.on_store_error) for n, p in policies.items()}\n"
        "    for tier, policies in ext.settings.tiers.items()\n"
        "}\n"
    )
    assert set(got) == {"default", "free", "enterprise"}
    for tier, policies in got.items():
        assert {name: p[0] for name, p in policies.items()} == expected(tier), tier
        assert policies["llm-requests"][1:] == ("requests", "local")
        assert policies["model-cap"][1:] == (None, "closed")


def test_a_free_tenant_waits_for_its_tiers_rate() -> None:
    """Run eagerly on an in-process store: a free tenant's sixth call waits 3 s (burst 5 at
    20/m) while a default-tier tenant's calls all run at once."""
    got = run_example(
        f"""
from examples.django_celery import ask_model
from throttle import Keyspace, MemoryStore
from throttle.testing import ManualClock

clock = ManualClock()
slept = []


def sleep(seconds):
    slept.append(seconds)
    clock.advance(seconds)


store = MemoryStore(Keyspace({SECRET!r}), clock=clock)
app, ext = example_app(store=store, clock=clock, sleep=sleep)
app.conf.task_always_eager = True
# The example's task, registered on this app with the same options.
task = app.task(
    ask_model.run,
    shared=False,
    name="test.ask_model",
    throttle=list(ask_model.throttle),
    throttle_cost=ask_model.throttle_cost,
    throttle_identity=ask_model.throttle_identity,
)


def call(api_key):
    kwargs = {{"prompt": "plan the trip", "api_key": api_key, "agent_id": "a"}}
    return task.apply(kwargs=kwargs).get()


result = {{"default": [call("sk-default-tenant") for _ in range(6)], "after_default": list(slept)}}
result["free"] = [call("sk-free-tenant") for _ in range(6)]
result["after_free"] = list(slept)
"""
    )
    assert got["default"] == got["free"] == ["plan the trip"] * 6
    assert got["after_default"] == []
    assert got["after_free"] == pytest.approx([3.0])


def test_the_celery_module_runs_without_django() -> None:
    """examples/django_celery.py imports with Django made unimportable, loads the settings and
    registers its throttled task."""
    got = run_example(
        "import examples.django_celery as m\n"
        "ext = m.app._throttle_extension\n"
        "result = {\n"
        "    'tasks': sorted(t for t in m.app.tasks if not t.startswith('celery.')),\n"
        "    'limits': sorted(ext.settings.limit_names),\n"
        "    'tiers': sorted(ext.settings.tiers),\n"
        "}\n"
    )
    assert got == {
        "tasks": ["agents.ask_model"],
        "limits": ["agent-share", "llm-requests", "llm-tokens", "model-cap"],
        "tiers": ["default", "enterprise", "free"],
    }
