# SPDX-License-Identifier: MIT
"""Reading what an LLM provider says about its limits: every header dialect, hostile values,
and 429s recognised in the exceptions of real HTTP client libraries."""

from __future__ import annotations

import logging
import math
import pickle
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from throttle.adaptive import Feedback, UpstreamThrottled, feedback_from, parse_headers
from throttle.adaptive.upstream import DEFAULT_MAX_DELAY, MAX_SPAN

NOW = 1_800_000_000.0  # the wall time the answers are read at (epoch seconds)


def at(offset: float) -> datetime:
    return datetime.fromtimestamp(NOW + offset, tz=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("20", 20.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (format_datetime(at(90), usegmt=True), 90.0),
        (format_datetime(at(-30), usegmt=True), 0.0),  # a date in the past: go now
        ("999999999", DEFAULT_MAX_DELAY),  # cut to the longest delay taken
    ],
)
def test_retry_after_in_seconds_and_as_an_http_date(value: str, seconds: float) -> None:
    """Retry-After as delta seconds or an HTTP-date, measured from the given wall time."""
    assert parse_headers({"Retry-After": value}, now=NOW).retry_after == seconds


@pytest.mark.parametrize("value", ["-5", "soon", "", "NaN", "inf", "1e400", "Tue, 99 Foo 2026"])
def test_a_bad_retry_after_is_ignored_and_logged(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Negative, non-numeric and non-date values are dropped with a debug log naming the
    header; nothing is raised."""
    with caplog.at_level(logging.DEBUG, logger="throttle.upstream"):
        feedback = parse_headers({"retry-after": value}, now=NOW)
    assert feedback.retry_after is None
    assert not feedback
    assert "retry-after" in caplog.text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("250us", 0.00025),
        ("0.5", 0.5),
        ("17", 17.0),
    ],
)
def test_openai_style_resets_are_durations(value: str, seconds: float) -> None:
    """x-ratelimit-reset-* values are Go-style durations or plain seconds."""
    feedback = parse_headers({"x-ratelimit-reset-tokens": value}, now=NOW)
    assert feedback.reset["tokens"] == pytest.approx(seconds, rel=1e-12)


def test_openai_style_headers() -> None:
    """Limits, remaining counts and resets per kind; with no Retry-After the delay is the
    reset of the kind that ran out."""
    feedback = parse_headers(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1m30s",
            "x-ratelimit-limit-tokens": "200000",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        now=NOW,
    )
    assert feedback.limit == {"requests": 500, "tokens": 200000}
    assert feedback.remaining == {"requests": 0, "tokens": 149984}
    assert feedback.reset == {"requests": 90.0, "tokens": 360.0}
    assert feedback.delay == 90.0  # tokens remain, requests do not
    with_retry = parse_headers({"retry-after": "3", "x-ratelimit-remaining-requests": "0"})
    assert with_retry.delay == 3.0  # Retry-After wins


def test_anthropic_style_headers() -> None:
    """anthropic-ratelimit-* with RFC 3339 resets, measured from the given wall time."""
    feedback = parse_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": at(12).isoformat().replace("+00:00", "Z"),
            "anthropic-ratelimit-input-tokens-remaining": "4000",
            "anthropic-ratelimit-input-tokens-reset": at(-5).isoformat(),
        },
        now=NOW,
    )
    assert feedback.limit == {"requests": 50}
    assert feedback.remaining == {"requests": 0, "input-tokens": 4000}
    assert feedback.reset == {"requests": pytest.approx(12.0), "input-tokens": 0.0}
    assert feedback.delay == pytest.approx(12.0)


def test_ietf_named_policies() -> None:
    """The current draft: RateLimit with r and t per policy, RateLimit-Policy with q and w."""
    feedback = parse_headers(
        {
            "RateLimit": '"burst";r=0;t=4, "daily";r=900;t=40000',
            "RateLimit-Policy": '"burst";q=10;w=5, "daily";q=1000;w=86400',
        }
    )
    assert feedback.remaining == {"burst": 0, "daily": 900}
    assert feedback.reset == {"burst": 4.0, "daily": 40000.0}
    assert feedback.limit == {"burst": 10, "daily": 1000}
    assert feedback.window == {"burst": 5.0, "daily": 86400.0}
    assert feedback.delay == 4.0


def test_ietf_older_forms() -> None:
    """The earlier drafts: separate RateLimit-Limit/-Remaining/-Reset headers, or one
    RateLimit field of key=value pairs, and an unnamed policy list (its first policy)."""
    separate = parse_headers(
        {
            "RateLimit-Limit": "100",
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": "30",
            "RateLimit-Policy": "100;w=60, 5000;w=3600",
        }
    )
    assert separate.limit == {"ratelimit": 100}
    assert separate.remaining == {"ratelimit": 0}
    assert separate.reset == {"ratelimit": 30.0}
    assert separate.window == {"ratelimit": 60.0}
    assert separate.delay == 30.0
    combined = parse_headers({"RateLimit": "limit=10, remaining=1, reset=7"})
    assert combined.limit == {"ratelimit": 10}
    assert combined.remaining == {"ratelimit": 1}
    assert combined.reset == {"ratelimit": 7.0}
    assert combined.delay is None  # one call is left


def test_header_containers() -> None:
    """Names in any case; str or bytes; a mapping, a list of pairs, or httpx's Headers."""
    expected = parse_headers({"retry-after": "4", "x-ratelimit-remaining-tokens": "5"})
    for headers in (
        {"RETRY-AFTER": "4", "X-RateLimit-Remaining-Tokens": "5"},
        [(b"retry-after", b"4"), (b"x-ratelimit-remaining-tokens", b"5")],
        httpx.Headers({"Retry-After": "4", "x-ratelimit-remaining-tokens": "5"}),
        {"retry-after": 4, "x-ratelimit-remaining-tokens": 5},
    ):
        assert parse_headers(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining-requests": "-3"},
        {"x-ratelimit-remaining-requests": "lots"},
        {"x-ratelimit-remaining-requests": "1e999"},
        {"x-ratelimit-reset-requests": "-1s"},
        {"x-ratelimit-reset-requests": "5 parsecs"},
        {"x-ratelimit-reset-requests": "1s" * 100},
        {"x-ratelimit-reset-requests": "9" * 400},
        {"anthropic-ratelimit-requests-reset": "2026-13-45T99:99:99Z"},
        {"anthropic-ratelimit-requests-reset": "2026-01-01T00:00:00"},  # no zone: unknowable
        {"ratelimit": '"p";r=abc;t=-4'},
        {"ratelimit-policy": '"p";q=;w=forever'},
        {"ratelimit": ';;;,,,=""'},
    ],
)
def test_hostile_values_are_ignored(headers: dict[str, str]) -> None:
    """Garbage, negative and enormous values are left out; the rest of the answer stands."""
    feedback = parse_headers({**headers, "retry-after": "2"}, now=NOW)
    assert feedback == Feedback(retry_after=2.0)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "retry-after",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-tokens",
                "anthropic-ratelimit-tokens-reset",
                "ratelimit",
                "ratelimit-policy",
                "ratelimit-reset",
                "ratelimit-remaining",
            ]
        )
        | st.text(max_size=30),
        st.text(max_size=80) | st.binary(max_size=40),
        max_size=8,
    )
)
def test_no_header_value_raises_or_yields_a_bad_number(headers: dict[str, object]) -> None:
    """Whatever a provider sends: no exception; every number is finite and >= 0; Retry-After
    is at most the longest delay taken, resets and windows at most the longest span."""
    feedback = parse_headers(headers, now=NOW)  # type: ignore[arg-type]
    numbers = [*feedback.remaining.values(), *feedback.limit.values()]
    spans = [*feedback.reset.values(), *feedback.window.values()]
    assert all(math.isfinite(n) and n >= 0 for n in numbers)
    assert all(0 <= d <= MAX_SPAN for d in spans)
    assert feedback.retry_after is None or 0 <= feedback.retry_after <= DEFAULT_MAX_DELAY


def _httpx_429(headers: dict[str, str]) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(429, headers=headers, request=request)
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        return exc
    raise AssertionError("raise_for_status did not raise")


def _requests_error(status: int, headers: dict[str, str]) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers)
    response.url = "http://127.0.0.1:9/v1/messages"
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        return exc
    raise AssertionError("raise_for_status did not raise")


def test_429s_of_real_client_libraries_are_recognised() -> None:
    """httpx's and requests' errors for a 429 carry the provider's feedback; other statuses
    and other exceptions carry none."""
    from_httpx = feedback_from(_httpx_429({"retry-after": "12"}))
    assert from_httpx is not None
    assert from_httpx.delay == 12.0
    from_requests = feedback_from(_requests_error(429, {"x-ratelimit-reset-requests": "2s"}))
    assert from_requests is not None
    assert from_requests.reset == {"requests": 2.0}
    assert feedback_from(_requests_error(500, {"retry-after": "1"})) is None
    assert feedback_from(ValueError("429")) is None


def test_upstream_throttled_carries_its_delay_and_survives_a_result_backend() -> None:
    """retry_after wins over the headers; bad values are ignored; the exception pickles (as a
    result backend stores it) with its delay and limits."""
    raised = UpstreamThrottled(headers={"Retry-After": "30"}, limits=["llm-tokens"])
    assert raised.delay == 30.0
    assert raised.limits == ("llm-tokens",)
    assert UpstreamThrottled(5, headers={"Retry-After": "30"}).delay == 5.0
    assert UpstreamThrottled(-1, headers={"Retry-After": "30"}).delay == 30.0
    assert UpstreamThrottled(float("nan")).delay is None
    assert UpstreamThrottled(1e12).delay == DEFAULT_MAX_DELAY
    back = pickle.loads(pickle.dumps(raised))
    assert (type(back), back.delay, back.limits) == (UpstreamThrottled, 30.0, ("llm-tokens",))
    assert str(back) == "the upstream provider throttled the call (retry after 30 s)"
    assert feedback_from(raised) == raised.feedback
    assert feedback_from(UpstreamThrottled(7, headers={"Retry-After": "30"})).delay == 7.0  # type: ignore[union-attr]
