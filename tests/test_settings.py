# SPDX-License-Identifier: MIT
"""Settings and task options: everything malformed is refused early, naming the key."""

from __future__ import annotations

import functools
import sys
import types
from typing import Any

import pytest
from celery import Celery

import throttle
from tests.conftest import SECRET
from throttle import ConfigurationError
from throttle.celeryext.settings import load_settings, redact_url

BASE: dict[str, Any] = {
    "broker_url": "redis://127.0.0.1:6379/0",
    "throttle_key_secret": SECRET,
    "throttle_limits": {"llm": {"rate": "100/m", "burst": 20}},
}


def app_with(**conf: Any) -> Celery:
    app = Celery("settings", set_as_current=False)
    app.task = functools.partial(app.task, shared=False)  # type: ignore[method-assign]
    app.conf.update({**BASE, **conf})
    return app


def test_defaults() -> None:
    """A minimal configuration loads, taking the store URL from a Redis broker."""
    settings = load_settings(app_with().conf)
    assert settings.redis_url == BASE["broker_url"]
    assert settings.max_defer == 300
    assert settings.policy("llm").limit.burst == 20
    assert settings.policy("llm").on_store_error == "local"
    assert settings.guard_ttl == 3600 + 100 + 600


@pytest.mark.parametrize(
    ("conf", "key"),
    [
        ({"throttle_bogus": 1}, "throttle_bogus"),
        ({"throttle_limits": {"llm": {"rate": "100/fortnight"}}}, "throttle_limits['llm'].rate"),
        (
            {"throttle_limits": {"llm": {"rate": "10/s", "burst": -1}}},
            "throttle_limits['llm'].burst",
        ),
        ({"throttle_limits": {"llm": {"burst": 5}}}, "throttle_limits['llm'].rate"),
        ({"throttle_limits": {"llm": {"rate": "1/s", "colour": "red"}}}, "throttle_limits['llm']"),
        (
            {"throttle_limits": {"llm": {"rate": "1/s", "mode": "dry"}}},
            "throttle_limits['llm'].mode",
        ),
        (
            {"throttle_limits": {"llm": {"rate": "1/s", "per": ["model"]}}},
            "throttle_limits['llm'].per",
        ),
        ({"throttle_limits": {"llm": {"rate": "1/s", "on_store_error": "x"}}}, "on_store_error"),
        ({"throttle_limits": ["llm"]}, "throttle_limits"),
        ({"throttle_tiers": {"gold": {"nope": {"rate": "1/s"}}}}, "throttle_tiers['gold']['nope']"),
        (
            {"throttle_tiers": {"gold": {"llm": {"rate": "0/s"}}}},
            "throttle_tiers['gold']['llm'].rate",
        ),
        ({"throttle_tiers": {"{bad}": {}}}, "throttle_tiers"),
        ({"throttle_max_defer": 0}, "throttle_max_defer"),
        ({"throttle_max_defer": "300"}, "throttle_max_defer"),
        ({"throttle_max_defer": 2000}, "throttle_max_defer"),
        ({"throttle_max_deferrals": 0}, "throttle_max_deferrals"),
        ({"throttle_socket_timeout": float("nan")}, "throttle_socket_timeout"),
        ({"throttle_on_store_error": "maybe"}, "throttle_on_store_error"),
        ({"throttle_key_secret": "short"}, "throttle_key_secret"),
        ({"throttle_key_secret": None}, "throttle_key_secret"),
        ({"throttle_redis_url": "http://example"}, "throttle_redis_url"),
        ({"broker_url": "amqp://guest@localhost//"}, "throttle_redis_url"),
        ({"throttle_tier_resolver": "no.such.module:fn"}, "throttle_tier_resolver"),
        ({"throttle_tier_resolver": 42}, "throttle_tier_resolver"),
        ({"throttle_redis_cluster": "yes"}, "throttle_redis_cluster"),
        ({"throttle_key_prefix": "a{b}"}, "throttle_key_prefix"),
        ({"throttle_dimensions": "model"}, "throttle_dimensions"),
    ],
)
def test_bad_settings_name_the_key(conf: dict[str, Any], key: str) -> None:
    """Each malformed setting is a ConfigurationError at Throttle(app) naming the key."""
    with pytest.raises(ConfigurationError) as info:
        throttle.Throttle(app_with(**conf))
    assert key in str(info.value)


def test_visibility_timeout_is_respected() -> None:
    """max_defer must stay below half the Redis broker's visibility timeout."""
    options = {"visibility_timeout": 100}
    with pytest.raises(ConfigurationError, match="visibility timeout of 100"):
        load_settings(app_with(broker_transport_options=options, throttle_max_defer=60).conf)
    ok = load_settings(app_with(broker_transport_options=options, throttle_max_defer=50).conf)
    assert ok.guard_ttl == 3600  # at least an hour
    amqp = app_with(broker_url="amqp://guest@localhost//", throttle_redis_url="redis://x/0")
    assert load_settings(amqp.conf).max_defer == 300  # no visibility timeout on AMQP


def test_django_style_namespace(tmp_path: Any) -> None:
    """CELERY_THROTTLE_* settings work through config_from_object(namespace='CELERY'), and an
    unknown one is refused under that name too."""
    module = types.ModuleType("django_like_settings")
    module.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"  # type: ignore[attr-defined]
    module.CELERY_THROTTLE_KEY_SECRET = SECRET  # type: ignore[attr-defined]
    module.CELERY_THROTTLE_LIMITS = {"llm": {"rate": "5/s"}}  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        app = Celery("django", set_as_current=False)
        app.config_from_object(module.__name__, namespace="CELERY")
        assert throttle.Throttle(app).settings.policy("llm").limit.rate.count == 5
        module.CELERY_THROTTLE_TYPO = 1  # type: ignore[attr-defined]
        app2 = Celery("django2", set_as_current=False)
        app2.config_from_object(module.__name__, namespace="CELERY")
        with pytest.raises(ConfigurationError, match="throttle_typo"):
            throttle.Throttle(app2)
    finally:
        del sys.modules[module.__name__]


def test_tiers_override_limits_and_resolve() -> None:
    """A tier overrides only what it names; the resolver picks the tier of an identity."""
    resolver_module = types.ModuleType("billing_for_test")
    resolver_module.tier_for = lambda identity: "gold" if identity.get("api_key") == "vip" else None  # type: ignore[attr-defined]
    sys.modules["billing_for_test"] = resolver_module
    try:
        ext = throttle.Throttle(
            app_with(
                throttle_tiers={"gold": {"llm": {"rate": "1000/m"}}},
                throttle_tier_resolver="billing_for_test:tier_for",
            )
        )
    finally:
        del sys.modules["billing_for_test"]
    gold = ext.settings.policy("llm", "gold").limit
    assert gold.rate.count == 1000
    assert gold.burst == 20  # inherited from the base limit
    assert ext.settings.policy("llm", "unknown-tier").limit.rate.count == 100
    assert ext.gate.tier_of({"api_key": "vip"}) == "gold"
    assert ext.gate.tier_of({"api_key": "someone"}) == "default"


def test_missing_secret_only_with_explicit_dev_mode() -> None:
    """Without a secret, only throttle_insecure_dev_secret=True allows a fixed dev secret."""
    settings = load_settings(
        app_with(throttle_key_secret=None, throttle_insecure_dev_secret=True).conf
    )
    assert b"insecure" in settings.key_secret


def test_settings_repr_and_errors_hide_credentials() -> None:
    """A password in throttle_redis_url never shows in the settings repr or in errors."""
    url = "redis://user:s3cret-pass@127.0.0.1:6379/0"
    settings = load_settings(app_with(throttle_redis_url=url).conf)
    assert "s3cret" not in repr(settings)
    assert redact_url(url) == "redis://user:***@127.0.0.1:6379/0"
    with pytest.raises(ConfigurationError) as info:
        load_settings(app_with(throttle_redis_url="http://user:s3cret@host/0").conf)
    assert "s3cret" not in str(info.value)


@pytest.fixture
def app() -> Celery:
    """A fresh app with the base settings."""
    return app_with()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"throttle": []}, "expected limit names"),
        ({"throttle": [3]}, "not a limit name"),
        ({"throttle": ["llm", "llm"]}, "twice"),
        ({"throttle": ["llm", "5/s"]}, "only entry"),
        ({"throttle": "5/fortnight"}, "cannot parse"),
        ({"throttle": ["llm"], "throttle_cost": {"other": 1}}, "not throttled by"),
        ({"throttle": ["llm"], "throttle_cost": {"llm": "many"}}, "number or callable"),
        ({"throttle": ["llm"], "throttle_identity": {"api_key": 7}}, "keyword argument name"),
    ],
)
def test_bad_decorator_options_fail_at_decoration(options: dict[str, Any], match: str) -> None:
    """throttle.limit() refuses malformed options when the function is decorated."""
    names = options.pop("throttle")
    names = [names] if isinstance(names, str) else names
    with pytest.raises(ConfigurationError, match=match):
        throttle.limit(
            *names,
            cost=options.get("throttle_cost"),
            identity=options.get("throttle_identity"),
        )


def test_unknown_limit_in_a_task_option_fails_at_registration(app: Celery) -> None:
    """An unknown limit name in a task option is refused when the app's tasks are registered,
    naming the task and the limits that exist (and it stops a worker from starting)."""
    ext = throttle.Throttle(app)

    @app.task(name="t.bad", throttle=["nope"])
    def bad() -> None: ...

    with pytest.raises(ConfigurationError, match=r"task 't.bad' throttle: unknown limit 'nope'"):
        ext.gate.spec_for(app.tasks["t.bad"])


def test_both_spellings_end_in_the_same_spec(app: Celery) -> None:
    """The task option and the decorator give the same task spec."""
    ext = throttle.Throttle(app)

    def cost(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return 10

    @app.task(name="t.option", throttle=["llm"], throttle_cost={"llm": cost})
    def by_option() -> None: ...

    @app.task(name="t.decorator")
    @throttle.limit("llm", cost={"llm": cost})
    def by_decorator() -> None: ...

    one = ext.gate.spec_for(app.tasks["t.option"])
    two = ext.gate.spec_for(app.tasks["t.decorator"])
    assert one == two
    assert one is not None
    assert one.names == ("llm",)


def test_inline_rate_is_a_per_key_limit(app: Celery) -> None:
    """throttle='100/m' makes a limit named after the task, keyed per API key."""
    ext = throttle.Throttle(app)

    @app.task(name="t.inline", throttle="100/m")
    def inline() -> None: ...

    spec = ext.gate.spec_for(app.tasks["t.inline"])
    assert spec is not None
    assert spec.inline is not None
    assert spec.inline.limit.rate.count == 100
    assert spec.inline.limit.per == ("api_key",)
    assert spec.names == ("task.t.inline",)


def test_decorator_on_top_of_the_task_is_refused(app: Celery) -> None:
    """Stacking @throttle.limit above @app.task is an error that says which way round."""
    throttle.Throttle(app)
    with pytest.raises(ConfigurationError, match=r"below @app\.task"):

        @throttle.limit("llm")
        @app.task(name="t.reversed", lazy=False)
        def reversed_order() -> None: ...


def test_the_documented_interface(redis_server: Any) -> None:
    """The interface of the README (and of the issue that defined it) loads as written and
    gives each task the limits, costs and tiers it names."""
    billing = types.ModuleType("myapp_billing_for_test")
    billing.tier_for = lambda identity: "agent"  # type: ignore[attr-defined]
    sys.modules[billing.__name__] = billing
    try:
        app = Celery("agents", broker=redis_server.url, set_as_current=False)
        app.task = functools.partial(app.task, shared=False)  # type: ignore[method-assign]
        app.conf.update(
            throttle_redis_url=redis_server.url,
            throttle_key_secret="...-a-long-random-secret-...",
            throttle_limits={
                "llm-requests": {"rate": "100/m", "burst": 20, "per": ["api_key"]},
                "llm-tokens": {"rate": "200000/m", "unit": "tokens", "per": ["api_key"]},
                "agent-share": {"rate": "30/m", "burst": 10, "per": ["api_key", "agent_id"]},
            },
            throttle_tiers={
                "agent": {"llm-requests": {"rate": "200/m"}},
                "admin": {"llm-requests": {"rate": "1000/m"}},
            },
            throttle_tier_resolver=f"{billing.__name__}:tier_for",
        )
        ext = throttle.Throttle(app)
    finally:
        del sys.modules[billing.__name__]

    def estimate_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return 512 + int(kwargs.get("max_tokens", 512))

    @app.task(
        name="agents.agent_step",
        throttle=["llm-requests", "agent-share", "llm-tokens"],
        throttle_cost={"llm-tokens": estimate_tokens},
    )
    def agent_step(prompt: str, *, api_key: str, agent_id: str, max_tokens: int = 512) -> None:
        throttle.report_usage({"llm-tokens": 100})

    task = app.tasks["agents.agent_step"]
    spec = ext.gate.spec_for(task)
    assert spec is not None
    assert spec.names == ("llm-requests", "agent-share", "llm-tokens")
    assert spec.costs(("hi",), {"max_tokens": 100}) == {"llm-tokens": 612}
    identity = ext.gate.identity(spec, "id-1", ("hi",), {"api_key": "k", "agent_id": "a"}, {})
    assert identity["tier"] == "agent"
    assert ext.settings.policy("llm-requests", "agent").limit.rate.count == 200
