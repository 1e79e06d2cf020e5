# SPDX-License-Identifier: MIT
"""What an LLM provider says about its own limits, read from its answer.

Providers speak in several dialects; :func:`parse_headers` understands them all and returns one
:class:`Feedback`:

- ``Retry-After``: delta seconds (``"20"``, also ``"1.5"``) or an HTTP-date.
- OpenAI style: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets as Go-style
  durations (``"6m0s"``, ``"1s"``, ``"20ms"``, ``"1h2m3.5s"``) or plain seconds.
- Anthropic style: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  {limit,remaining,reset}``, resets as RFC 3339 timestamps.
- The IETF fields, both generations of the draft: ``RateLimit: "default";r=50;t=30`` with
  ``RateLimit-Policy: "default";q=100;w=60`` (named policies), and the older
  ``RateLimit-Limit``/``-Remaining``/``-Reset`` headers (and ``RateLimit: limit=..,
  remaining=.., reset=..``), whose policy has no name and is reported as ``"ratelimit"``.

Providers are not trusted: a value that does not parse, or is negative, is ignored (with a debug
log naming the header); a ``Retry-After`` longer than ``max_delay`` is cut to it, a reset or a
window longer than :data:`MAX_SPAN` to that. Nothing here raises on what a provider sends.

:func:`feedback_from` recognises a provider's 429 in an exception without depending on any client
library: an :class:`UpstreamThrottled`, or any exception carrying a status code of 429 (on
itself, as httpx's ``HTTPStatusError`` and the openai/anthropic errors do through their
``response``) and the response headers.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from throttle.errors import ThrottleError
from throttle.limits import finite_number

__all__ = [
    "DEFAULT_MAX_DELAY",
    "MAX_SPAN",
    "Feedback",
    "UpstreamThrottled",
    "feedback_from",
    "parse_headers",
]

logger = logging.getLogger("throttle.upstream")

#: The longest delay taken from a provider unless the caller says otherwise (seconds).
DEFAULT_MAX_DELAY = 3600.0
_MAX_COUNT = 1e15  # a remaining or limit count above this is not a count
#: The longest reset or window believed (seconds): a week covers any provider's daily quota.
MAX_SPAN = 7 * 86400.0
_SHOWN = 64  # characters of a rejected value shown in the debug log

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")
_VENDOR = re.compile(
    r"(?:x-ratelimit-(limit|remaining|reset)-(.+)|"
    r"anthropic-ratelimit-(.+)-(limit|remaining|reset))"
)


@dataclass(frozen=True)
class Feedback:
    """What one answer said. Counts are keyed by kind: ``"requests"``, ``"tokens"`` (and
    Anthropic's ``"input-tokens"``, ``"output-tokens"``), an IETF policy's name, or
    ``"ratelimit"`` for the unnamed IETF policy. Durations are seconds from the answer."""

    retry_after: float | None = None
    remaining: Mapping[str, float] = field(default_factory=dict)
    reset: Mapping[str, float] = field(default_factory=dict)
    limit: Mapping[str, float] = field(default_factory=dict)
    window: Mapping[str, float] = field(default_factory=dict)

    @property
    def delay(self) -> float | None:
        """How long to wait before calling again: ``Retry-After`` when given, else the longest
        reset among the kinds with nothing remaining; None when the answer does not say."""
        if self.retry_after is not None:
            return self.retry_after
        spent = [
            self.reset[k] for k, left in self.remaining.items() if left <= 0 and k in self.reset
        ]
        return max(spent) if spent else None

    def __bool__(self) -> bool:
        return bool(
            self.retry_after is not None
            or self.remaining
            or self.reset
            or self.limit
            or self.window
        )


class UpstreamThrottled(ThrottleError):
    """Raise it in a task when the provider said "too many requests".

    The gate then defers the task by the provider's delay (it does not count as a retry) and
    pauses, for the task's API key, the limits named in ``limits`` (default: the task's own),
    so every worker backs off, not only the one that was told. ``retry_after`` (seconds) wins
    over what ``headers`` (the provider's response headers) say; a value that is not a finite
    number >= 0 is ignored, and one above :data:`DEFAULT_MAX_DELAY` is cut to it.
    """

    def __init__(
        self,
        retry_after: float | None = None,
        headers: Mapping[str, Any] | Iterable[tuple[Any, Any]] | None = None,
        limits: Sequence[str] = (),
    ) -> None:
        kept = _plain_headers(headers) if headers is not None else None
        if isinstance(limits, str):
            limits = (limits,)
        self.limits = tuple(str(name) for name in limits)
        self.headers = kept
        self.retry_after = _seconds(retry_after, "retry_after", DEFAULT_MAX_DELAY)
        said = parse_headers(kept or {})
        #: What the provider said, with ``retry_after`` in place of its Retry-After when given.
        self.feedback = (
            said if self.retry_after is None else replace(said, retry_after=self.retry_after)
        )
        super().__init__(retry_after, kept, self.limits)

    @property
    def delay(self) -> float | None:
        """The wait the provider asked for: ``retry_after``, else what the headers say."""
        return self.feedback.delay

    def __str__(self) -> str:
        delay = self.delay
        said = "no delay given" if delay is None else f"retry after {delay:g} s"
        return f"the upstream provider throttled the call ({said})"


def parse_headers(
    headers: Mapping[str, Any] | Iterable[tuple[Any, Any]],
    *,
    now: float | None = None,
    max_delay: float = DEFAULT_MAX_DELAY,
) -> Feedback:
    """Read a provider's rate-limit headers (any mapping or list of pairs; names in any case,
    names and values as str or bytes). ``now`` is the wall time (epoch seconds) that
    HTTP-dates and timestamps are measured from; default the system's."""
    fields = _plain_headers(headers)
    wall = time.time() if now is None else now
    remaining: dict[str, float] = {}
    reset: dict[str, float] = {}
    limit: dict[str, float] = {}
    window: dict[str, float] = {}
    by_what = {"remaining": remaining, "reset": reset, "limit": limit}
    retry_after = None
    if "retry-after" in fields:
        retry_after = _retry_after(fields["retry-after"], wall, max_delay)
    for name, value in fields.items():
        match = _VENDOR.fullmatch(name)
        if match is None:
            continue
        if match.group(1):
            what, kind = match.group(1), match.group(2)
        else:
            kind, what = match.group(3), match.group(4)
        parsed = _reset(name, value, wall) if what == "reset" else _count(name, value)
        if parsed is not None:
            by_what[what][kind] = parsed
    _ietf(fields, remaining, reset, limit, window)
    return Feedback(retry_after, remaining, reset, limit, window)


def feedback_from(exc: BaseException, *, now: float | None = None) -> Feedback | None:
    """The provider's feedback if ``exc`` says it throttled the call, else None.

    An :class:`UpstreamThrottled` gives its own; any other exception counts when it carries
    HTTP status 429, as ``status_code`` or ``status`` on itself or on its ``response`` (httpx,
    openai, anthropic and requests all do one of these); its headers are read from the same
    place.
    """
    if isinstance(exc, UpstreamThrottled):
        return exc.feedback
    response = getattr(exc, "response", None)
    status = _status(exc)
    if status is None and response is not None:
        status = _status(response)
    if status != 429:
        return None
    headers = getattr(exc, "headers", None)
    if headers is None and response is not None:
        headers = getattr(response, "headers", None)
    try:
        return parse_headers(headers or {}, now=now)
    except Exception:  # headers of a shape nobody expected: the 429 still counts
        logger.debug("upstream 429 with unreadable headers: %s", _shown(headers))
        return Feedback()


# -- the dialects ------------------------------------------------------------------------------


def _ietf(
    fields: Mapping[str, str],
    remaining: dict[str, float],
    reset: dict[str, float],
    limit: dict[str, float],
    window: dict[str, float],
) -> None:
    unnamed = "ratelimit"
    for header, target in (
        ("ratelimit-limit", limit),
        ("ratelimit-remaining", remaining),
        ("ratelimit-reset", reset),
    ):
        if header in fields:
            first = fields[header].split(",")[0]
            value = (
                _seconds(first, header, MAX_SPAN)
                if target is reset
                else _count(header, first.split(";")[0])
            )
            if value is not None:
                target[unnamed] = value
    for name, params in _items(fields.get("ratelimit", "")):
        # Named policies ("default";r=50;t=30), or the older "limit=10, remaining=1, reset=7".
        kind = name or unnamed
        for key, target in (("r", remaining), ("remaining", remaining), ("limit", limit)):
            if key in params:
                _put(target, kind, _count(f"ratelimit {key}", params[key]))
        for key in ("t", "reset"):
            if key in params:
                _put(reset, kind, _seconds(params[key], f"ratelimit {key}", MAX_SPAN))
    quota: str | None
    for name, params in _items(fields.get("ratelimit-policy", "")):
        # "default";q=100;w=60, or the older unnamed "100;w=60" (its first policy is taken).
        if name is not None and _NUMBER.fullmatch(name):
            if unnamed in limit and unnamed in window:
                continue
            kind, quota = unnamed, name
        else:
            kind, quota = name or unnamed, params.get("q")
        if quota is not None:
            _put(limit, kind, _count("ratelimit-policy q", quota))
        if "w" in params:
            _put(window, kind, _seconds(params["w"], "ratelimit-policy w", MAX_SPAN))


def _put(target: dict[str, float], kind: str, value: float | None) -> None:
    if value is not None:
        target[kind] = value


def _items(value: str) -> list[tuple[str | None, dict[str, str]]]:
    """The members of a structured-field list, ``"name";k=v;k=v, ...``, as (name, params);
    a list of bare ``k=v`` members (the older draft) comes back as one unnamed item."""
    items: list[tuple[str | None, dict[str, str]]] = []
    bare: dict[str, str] = {}
    for member in value.split(","):
        parts = [p.strip() for p in member.split(";")]
        if not parts[0]:
            continue
        head = parts[0]
        if "=" in head and not head.startswith('"'):
            key, _, raw = head.partition("=")
            bare[key.strip().lower()] = raw.strip()
            continue
        name = head.strip('"')
        params = {}
        for part in parts[1:]:
            key, sep, raw = part.partition("=")
            if sep:
                params[key.strip().lower()] = raw.strip()
        items.append((name, params))
    if bare:
        items.append((None, bare))
    return items


def _retry_after(value: str, wall: float, max_delay: float) -> float | None:
    seconds = _seconds(value, "retry-after", max_delay, quiet=True)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        when = None
    if when is None or when.tzinfo is None:
        logger.debug("upstream header retry-after ignored: %s", _shown(value))
        return None
    return min(max(when.timestamp() - wall, 0.0), max_delay)


def _reset(name: str, value: str, wall: float) -> float | None:
    """A reset: a duration (``"6m0s"``, ``"20ms"``, ``"1.5"``) or an RFC 3339 timestamp."""
    text = value.strip()
    if "T" in text or (text.count("-") >= 2 and ":" in text):
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            logger.debug("upstream header %s ignored: %s", name, _shown(value))
            return None
        return min(max(when.timestamp() - wall, 0.0), MAX_SPAN)
    return _seconds(text, name, MAX_SPAN)


def _seconds(value: object, name: str, longest: float, *, quiet: bool = False) -> float | None:
    """A duration in seconds from a number or a duration string; None (logged) when it is not a
    finite duration >= 0; cut to ``longest``."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = finite_number(value)  # None for an int past any float, as for its digits
    elif isinstance(value, str):
        seconds = _duration(value.strip())
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        if value is not None and not quiet:
            logger.debug("upstream %s ignored: %s", name, _shown(value))
        return None
    return min(seconds, longest)


def _duration(text: str) -> float | None:
    number = _NUMBER.fullmatch(text)
    if number:
        return float(number.group(1))
    if not text or len(text) > 64:
        return None
    total, at = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != at:
            return None
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        at = part.end()
    return total if at == len(text) else None


def _count(name: str, value: str) -> float | None:
    number = _NUMBER.fullmatch(value)
    count = float(number.group(1)) if number else None
    if count is None or count > _MAX_COUNT:
        logger.debug("upstream header %s ignored: %s", name, _shown(value))
        return None
    return count


def _status(obj: object) -> int | None:
    for attr in ("status_code", "status"):
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _plain_headers(headers: Mapping[str, Any] | Iterable[tuple[Any, Any]]) -> dict[str, str]:
    """Header names lower-cased, names and values as str; a repeated name keeps its first value.
    Anything that is not a header is left out."""
    pairs: Iterable[Any]
    if isinstance(headers, Mapping) or hasattr(headers, "items"):
        pairs = headers.items()
    else:
        pairs = headers
    out: dict[str, str] = {}
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            continue
        name, value = (_text(p) for p in pair)
        if name is not None and value is not None:
            out.setdefault(name.strip().lower(), value)
    return out


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # an int with more digits than str() converts: no header has that
            return None
    return None


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than repr() converts
        text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "?"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
