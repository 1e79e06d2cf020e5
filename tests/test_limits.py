# SPDX-License-Identifier: MIT
"""Rates, limits and costs: what is accepted, and the errors for everything that is not."""

from __future__ import annotations

import math

import pytest

from throttle import ConfigurationError, CostError, Limit, Rate
from throttle.limits import check_cost


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/m", 100, 60),
        ("20/s", 20, 1),
        ("5000/h", 5000, 3600),
        ("1000000/d", 1_000_000, 86400),
        ("30/10m", 30, 600),
        ("0.7/s", 0.7, 1),
        ("3/minute", 3, 60),
        ("3/minutes", 3, 60),
        ("12 / 2h", 12, 7200),
        ("1e3/s", 1000, 1),
        ("5/1.5s", 5, 1.5),
    ],
)
def test_rate_forms(text: str, count: float, period: float) -> None:
    """Every documented rate form parses to the exact count and period."""
    assert Rate.parse(text) == Rate(count, period)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("60/m", "60/m"),
        ("30/10m", "30/10m"),
        ("0.7/s", "0.7/s"),
        ("5/90s", "5/90s"),
        ("1000000/d", "1000000/d"),
        ("120/60s", "120/m"),
        ("3/1.5s", "3/1.5s"),
    ],
)
def test_a_rate_is_shown_as_it_would_be_written(text: str, shown: str) -> None:
    """str(rate) picks the largest unit the period is a whole multiple of, and parses back."""
    assert str(Rate.parse(text)) == shown
    assert Rate.parse(shown) == Rate.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "100/fortnight",
        "-5/m",
        "0/s",
        "5/0s",
        "100",
        "/m",
        "100/ms",
        "100/mx",
        "nan/s",
        "inf/s",
        "1e400/s",
        "",
        "100/m/s",
        "ten/m",
    ],
)
def test_malformed_rates_are_rejected(text: str) -> None:
    """A malformed rate names the field and shows the accepted forms."""
    with pytest.raises(ConfigurationError) as info:
        Limit("x", text)
    assert "rate" in info.value.field
    assert "100/m" in str(info.value)


@pytest.mark.parametrize("value", [100, None, 1.5, ["100/m"]])
def test_rate_must_be_a_string(value: object) -> None:
    """A rate that is not a string or a Rate is rejected with the field named."""
    with pytest.raises(ConfigurationError, match="rate"):
        Limit("x", value)  # type: ignore[arg-type]


def test_default_burst_is_one_period_at_least_one() -> None:
    """Burst defaults to one period's worth of units, and never below 1."""
    assert Limit("a", "100/m").burst == 100
    assert Limit("b", "0.7/s").burst == 1
    assert Limit("c", "30/10m").burst == 30


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"burst": 0}, "burst"),
        ({"burst": -1}, "burst"),
        ({"burst": math.nan}, "burst"),
        ({"burst": math.inf}, "burst"),
        ({"burst": "10"}, "burst"),
        ({"burst": True}, "burst"),
        ({"burst": 5, "max_cost": 10}, "burst"),
        ({"max_cost": 0}, "max_cost"),
        ({"max_cost": math.nan}, "max_cost"),
        ({"per": ["api_key", "customer"]}, "per"),
        ({"per": ["agent_id"]}, "per"),
        ({"per": ["api_key", "api_key"]}, "per"),
        ({"per": 7}, "per"),
        ({"algorithm": "leaky"}, "algorithm"),
        ({"algorithm": "sliding_window", "burst": 5}, "burst"),
        ({"unit": ""}, "unit"),
        ({"anonymous": ""}, "anonymous"),
    ],
)
def test_malformed_limits_are_rejected(kwargs: dict[str, object], field: str) -> None:
    """Each malformed field of a limit is rejected when the limit is built, naming the field."""
    with pytest.raises(ConfigurationError) as info:
        Limit("llm", "100/m", **kwargs)  # type: ignore[arg-type]
    assert field in info.value.field
    assert "'llm'" in info.value.field


@pytest.mark.parametrize("name", ["", "a b", "{tag}", "x" * 65, "-lead", 5, None, "a:b"])
def test_bad_limit_names(name: object) -> None:
    """Limit names are short and cannot contain separators or hash-tag braces."""
    with pytest.raises(ConfigurationError, match="name"):
        Limit(name, "1/s")  # type: ignore[arg-type]


def test_custom_dimensions_must_be_declared() -> None:
    """A custom dimension is accepted once declared, and dimensions keep a canonical order."""
    with pytest.raises(ConfigurationError, match="unknown dimension 'model'"):
        Limit("m", "1/s", per=["model"])
    limit = Limit("m", "1/s", per=["model", "agent_id", "api_key"], dimensions=["model"])
    assert limit.per == ("api_key", "agent_id", "model")
    assert Limit("g", "1/s", per=[]).is_global
    assert not limit.is_global


@pytest.mark.parametrize(
    ("cost", "problem"),
    [
        ("3", "number"),
        (None, "number"),
        (True, "number"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (-1, "negative"),
        (11, "capacity"),
    ],
)
def test_bad_costs(cost: object, problem: str) -> None:
    """A cost that is not a finite number in [0, burst] raises CostError naming the limit."""
    limit = Limit("tokens", "100/m", burst=10, unit="tokens")
    with pytest.raises(CostError, match=problem) as info:
        check_cost(limit, cost)
    assert info.value.limit == "tokens"


def test_good_costs() -> None:
    """Zero, fractions and the full burst are valid costs."""
    limit = Limit("tokens", "100/m", burst=10)
    assert [check_cost(limit, c) for c in (0, 0.25, 10)] == [0.0, 0.25, 10.0]
