# SPDX-License-Identifier: MIT
"""Call a rate-limited HTTP API from an agent: retry what the server refused, as it asked.

:func:`request` (with an :class:`httpx.Client`) and :func:`arequest` (with an
:class:`httpx.AsyncClient`) send one request and, when the answer's status is one of
:attr:`Backoff.statuses` (default 429 and 503), wait and send it again, until an answer of
another status comes back or the budget runs out; then :class:`RetryBudgetExhausted` is raised
at once, carrying the last response. Any other status, 4xx and 5xx included, is returned as it
is: raising on it is the caller's business (``response.raise_for_status()``). Transport errors
(:class:`httpx.TransportError`: refused, reset, timed out) are not retried and leave unchanged.

The wait before each retry is :meth:`Backoff.delay`:

- **The server's hint first, never less.** A JSON body's ``retry_after`` (seconds, exact) when it
  is not above the ``Retry-After`` header: throttle's own middleware rounds its header up to
  whole seconds, as the header's grammar demands, and puts the exact figure in the body, so a
  client told "0.2 s" does not wait a whole second. Otherwise what the headers say
  (:func:`throttle.adaptive.upstream.parse_headers`: ``Retry-After`` as seconds or HTTP-date,
  the IETF ``RateLimit`` fields, ``x-ratelimit-reset-*``; garbage and negative values ignored,
  enormous ones cut to an hour).
- **Jitter on top.** Clients refused together are told the same moment; if they all came back
  then, the server would refuse most of them again, together. A random extra of up to
  ``min(cap, base * 2**(attempt - 1))`` spreads them out, and it is only ever added: no client
  comes back before the moment it was given.
- **Full jitter without a hint** (a 503 with no ``Retry-After``): a wait drawn uniformly from
  ``[0, min(cap, base * 2**attempt)]``, a window that doubles with each attempt.

Hazards:

- **Only retry what is safe to send twice.** A 429 or a 503 means the server did not act on the
  request, which is why re-sending those is safe even for a POST that spends money. Adding a
  status such as 500, 502 or 504 to :attr:`Backoff.statuses` is safe only for idempotent calls:
  the server may have acted before it failed.
- **Bodies are sent again.** A body given as ``content`` or ``data`` must be ``bytes`` or
  ``str``: an iterator, a generator or a file object would be empty the second time, so it is
  refused up front (:class:`~throttle.errors.ConfigurationError`) whenever a retry is possible.
  Files in ``files`` are re-read from the start (httpx seeks them), so they must be seekable.
- **Waiting holds the caller.** A worker blocked in :func:`request` serves nothing else; a
  Celery task that expects long waits should raise
  :class:`~throttle.adaptive.UpstreamThrottled` and be deferred by the gate instead.
- **The error keeps the response.** ``RetryBudgetExhausted.response.request`` still holds the
  request's headers (API keys) in this process. The message never shows them, nor the URL's
  query string or user info, and a pickled error (a Celery result backend) leaves them behind;
  the URL's path is shown, so an API that puts a key in the path leaks it there.
- **An hour at most per hint.** A hint above an hour is cut to one; with the default
  ``max_wait`` of a minute, a long hint ends the call at once with the error, which says what
  the server asked.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

try:
    import httpx
except ImportError as exc:  # an optional dependency: say how to get it
    raise ImportError("throttle.client needs httpx: pip install 'throttle[client]'") from exc

from throttle.adaptive.upstream import DEFAULT_MAX_DELAY, parse_headers
from throttle.errors import ConfigurationError, ThrottleError
from throttle.limits import finite_number

__all__ = [
    "DEFAULT_BACKOFF",
    "Backoff",
    "RetryBudgetExhausted",
    "arequest",
    "request",
    "server_hint",
]

#: A JSON body longer than this is not parsed for ``retry_after`` (a hint is a few bytes; a
#: megabyte of nested JSON from a misbehaving server is not worth the CPU, nor the recursion).
_MAX_HINT_BODY = 64 * 1024
#: 2.0 ** 1024 overflows a float; any exponent past this is at ``cap`` anyway.
_MAX_EXPONENT = 1023
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_SHOWN = 64  # characters of a rejected value shown in an error
_STATUSES_ACCEPTED = "a non-empty tuple of HTTP status codes from 400 to 599, e.g. (429, 503)"
_REPLAYABLE = "bytes or str (read a stream into bytes first), or Backoff(max_attempts=1)"


# The checks come before Backoff: DEFAULT_BACKOFF runs them when the module is imported.


def _statuses(value: object) -> tuple[int, ...]:
    if not isinstance(value, tuple | list | set | frozenset):
        raise ConfigurationError("Backoff.statuses", f"got {_shown(value)}", _STATUSES_ACCEPTED)
    items = sorted(value) if isinstance(value, set | frozenset) else list(value)
    if not items:
        raise ConfigurationError("Backoff.statuses", "is empty", _STATUSES_ACCEPTED)
    for status in items:
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ConfigurationError(
                "Backoff.statuses", f"{_shown(status)} is not an error status", _STATUSES_ACCEPTED
            )
    return tuple(dict.fromkeys(items))


def _attempt(attempt: object) -> int:
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ConfigurationError(
            "attempt", f"got {_shown(attempt)}", "the number of tries made, >= 1"
        )
    return attempt


def _shown(value: object) -> str:
    """``repr(value)``, short; also for an int too long for ``repr`` to convert."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits" if isinstance(value, int) else "?"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


@dataclass(frozen=True)
class Backoff:
    """How long to keep trying one call, and how long to wait between tries.

    ``max_attempts`` counts every try, the first one included (1: never retry).
    ``max_wait`` caps the seconds slept across all retries of one call: a wait that would take
    the total above it is not begun. ``base`` and ``cap`` (seconds) shape the jitter window,
    ``min(cap, base * 2**n)``. ``statuses`` are the answers that are retried (see the module's
    hazards before adding any but 429 and 503).

    Every field is checked on construction: a bool, NaN, an infinity or a negative number is a
    :class:`~throttle.errors.ConfigurationError` naming the field (``"Backoff.max_wait"``).
    ``statuses`` may be given as any collection of ints; it is kept as a tuple without repeats,
    in the order given (a set's sorted).
    """

    max_attempts: int = 5
    max_wait: float = 60.0
    base: float = 0.5
    cap: float = 30.0
    statuses: tuple[int, ...] = (429, 503)

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigurationError(
                "Backoff.max_attempts", f"got {_shown(attempts)}", "an int >= 1 (1: never retry)"
            )
        for name in ("max_wait", "base", "cap"):
            value = getattr(self, name)
            number = finite_number(value)
            if number is None or number < 0:
                raise ConfigurationError(
                    f"Backoff.{name}", f"got {_shown(value)}", "a finite number of seconds >= 0"
                )
            object.__setattr__(self, name, number)
        object.__setattr__(self, "statuses", _statuses(self.statuses))

    def window(self, n: int) -> float:
        """The jitter window after ``n`` doublings: ``min(cap, base * 2**n)`` seconds."""
        return min(self.cap, self.base * 2.0 ** min(max(n, 0), _MAX_EXPONENT))

    def delay(
        self,
        attempt: int,
        response: httpx.Response,
        rng: random.Random,
        *,
        now: float | None = None,
    ) -> float:
        """The seconds to wait before try ``attempt + 1``, after try ``attempt`` (from 1) was
        answered with ``response``.

        With a hint from the server (see the module docstring), the hint plus
        ``rng.uniform(0, window(attempt - 1))``: never earlier than asked. Without one,
        ``rng.uniform(0, window(attempt))``. ``now`` is the wall time (epoch seconds) that an
        HTTP-date in ``Retry-After`` is measured from; default the system's. Neither the status
        nor the budget is looked at here: :func:`request` does that.
        """
        return self._wait(_attempt(attempt), server_hint(response, now=now), rng)

    def _wait(self, attempt: int, hint: float | None, rng: random.Random) -> float:
        if hint is None:
            return rng.uniform(0.0, self.window(attempt))
        return hint + rng.uniform(0.0, self.window(attempt - 1))


#: The policy :func:`request` and :func:`arequest` use unless given another.
DEFAULT_BACKOFF = Backoff()


class RetryBudgetExhausted(ThrottleError):
    """The server kept refusing and the budget of a :class:`Backoff` ran out.

    ``response`` is the last answer (its status is one of the retried ones), ``attempts`` the
    tries made, ``waited`` the seconds slept between them, ``wanted`` the wait that would have
    come next when it would have passed ``max_wait`` (None when the attempts ran out), and
    ``asked`` the wait the server itself asked for in its last answer (None when it did not
    say). The message names the method, the URL without its query string, the status and these
    figures; never a header.

    Pickled (a Celery result backend, a process pool), the error leaves the process with a copy
    of the response that keeps its status, headers and body but not the request's headers,
    query string or user info, which may hold keys. Through a JSON result backend ``response``
    comes back as its repr (``"<Response [429 Too Many Requests]>"``).
    """

    def __init__(
        self,
        response: httpx.Response,
        attempts: int,
        waited: float,
        wanted: float | None = None,
        asked: float | None = None,
    ) -> None:
        self.response = response
        self.attempts = attempts
        self.waited = waited
        self.wanted = wanted
        self.asked = asked
        super().__init__(response, attempts, waited, wanted, asked)

    @property
    def status_code(self) -> int:
        """The status of the last answer."""
        return self.response.status_code

    def __reduce__(self) -> tuple[Any, ...]:
        shared = _without_secrets(self.response)
        return (type(self), (shared, self.attempts, self.waited, self.wanted, self.asked))

    def __str__(self) -> str:
        if isinstance(self.response, httpx.Response):
            status = self.response.status_code
            phrase = httpx.codes.get_reason_phrase(status)
            answer = f"{status} {phrase}" if phrase else str(status)
        else:  # rebuilt from a JSON result backend, which keeps only the response's repr
            answer = str(self.response)
        said = "gave no delay" if self.asked is None else f"asked to wait {self.asked:g} s"
        tries = "attempt" if self.attempts == 1 else "attempts"
        message = (
            f"{_target(self.response)} was refused with {answer} after {self.attempts} {tries} "
            f"and {self.waited:g} s of waiting (the server {said}): "
        )
        if self.wanted is None:
            return message + "no attempts left"
        return message + f"the next wait of {self.wanted:g} s would pass max_wait"


def request(
    client: httpx.Client,
    method: str,
    url: httpx.URL | str,
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    wall: Callable[[], float] = time.time,
    **kwargs: Any,
) -> httpx.Response:
    """Send ``client.request(method, url, **kwargs)``, retrying the statuses of ``backoff``.

    Returns the first answer whose status is not retried, whatever it is. Raises
    :class:`RetryBudgetExhausted` at once (without sleeping first) when the attempts are used
    up or the next wait would take the total slept above ``backoff.max_wait``;
    :class:`~throttle.errors.ConfigurationError` before sending when a streamed body could be
    retried; transport errors unchanged. ``rng`` draws the jitter (default a fresh
    :class:`random.Random`), ``sleep`` waits, ``wall`` is the epoch time HTTP-dates are read
    against: tests inject all three.
    """
    budget = _Budget(backoff, rng, wall, kwargs)
    while True:
        response = client.request(method, url, **kwargs)
        wait = budget.after(response)
        if wait is None:
            return response
        sleep(wait)


async def arequest(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL | str,
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    wall: Callable[[], float] = time.time,
    **kwargs: Any,
) -> httpx.Response:
    """:func:`request` for an :class:`httpx.AsyncClient`: the same decisions, awaited.

    ``sleep`` must be awaitable (default :func:`asyncio.sleep`; pass ``anyio.sleep`` under
    trio). Cancelling the task while it waits cancels the call; nothing is re-sent after.
    """
    budget = _Budget(backoff, rng, wall, kwargs)
    while True:
        response = await client.request(method, url, **kwargs)
        wait = budget.after(response)
        if wait is None:
            return response
        await sleep(wait)


def server_hint(response: httpx.Response, *, now: float | None = None) -> float | None:
    """The seconds ``response`` asks the client to wait, or None when it does not say.

    The JSON body's ``retry_after`` when it is a finite number >= 0 and not above the
    ``Retry-After`` header (or there is no readable one), cut to
    :data:`~throttle.adaptive.upstream.DEFAULT_MAX_DELAY`; else what the headers say. ``now``
    is the wall time HTTP-dates are measured from. Never raises on what a server sends.
    """
    said = parse_headers(response.headers, now=now)
    exact = _body_retry_after(response)
    if exact is not None and (said.retry_after is None or exact <= said.retry_after):
        return min(exact, DEFAULT_MAX_DELAY)
    return said.delay


class _Budget:
    """The state of one call across its tries, and the one place that decides what to do with
    each answer; :func:`request` and :func:`arequest` only send and sleep."""

    __slots__ = ("attempts", "backoff", "rng", "waited", "wall")

    def __init__(
        self,
        backoff: Backoff,
        rng: random.Random | None,
        wall: Callable[[], float],
        kwargs: Mapping[str, Any],
    ) -> None:
        if not isinstance(backoff, Backoff):
            raise ConfigurationError(
                "backoff", f"got {_shown(backoff)}", "a throttle.client.Backoff"
            )
        if backoff.max_attempts > 1:
            _check_replayable(kwargs)
        self.backoff = backoff
        self.rng = random.Random() if rng is None else rng
        self.wall = wall
        self.attempts = 0
        self.waited = 0.0

    def after(self, response: httpx.Response) -> float | None:
        """None when ``response`` is the answer to return; else the seconds to sleep before
        sending again (already counted in ``waited``). Raises :class:`RetryBudgetExhausted`
        when no retry fits the budget."""
        self.attempts += 1
        if response.status_code not in self.backoff.statuses:
            return None
        asked = server_hint(response, now=self.wall())
        if self.attempts >= self.backoff.max_attempts:
            raise RetryBudgetExhausted(response, self.attempts, self.waited, None, asked)
        wait = self.backoff._wait(self.attempts, asked, self.rng)
        if self.waited + wait > self.backoff.max_wait:
            raise RetryBudgetExhausted(response, self.attempts, self.waited, wait, asked)
        self.waited += wait
        return wait


def _check_replayable(kwargs: Mapping[str, Any]) -> None:
    """Refuse a body that a second send would find consumed: anything but bytes or str (for
    ``data``, also a form mapping). httpx would send such a body empty on the retry, without
    an error, so this is checked before the first send."""
    for name in ("content", "data"):
        body = kwargs.get(name)
        if body is None or isinstance(body, bytes | str):
            continue
        if name == "data" and isinstance(body, Mapping):
            continue
        raise ConfigurationError(
            name,
            f"a body of type {type(body).__name__} may be a stream, which cannot be sent again "
            "on a retry",
            _REPLAYABLE,
        )


def _body_retry_after(response: httpx.Response) -> float | None:
    """``retry_after`` from a JSON object body, if a finite number >= 0; else None."""
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return None
    try:
        body = response.content
    except httpx.ResponseNotRead:  # a streamed response: its body is not ours to read
        return None
    if len(body) > _MAX_HINT_BODY:
        return None
    try:
        data = response.json()
    except (ValueError, RecursionError):  # not JSON after all, or nested past any sense
        return None
    if not isinstance(data, dict):
        return None
    seconds = finite_number(data.get("retry_after"))
    return seconds if seconds is not None and seconds >= 0 else None


def _target(response: object) -> str:
    """``METHOD scheme://host:port/path`` of the request answered: no query string, no user
    info, as either may hold a key."""
    sent = _sent(response)
    return "the request" if sent is None else f"{sent.method} {_bare_url(sent.url)}"


def _sent(response: object) -> httpx.Request | None:
    if not isinstance(response, httpx.Response):
        return None
    try:
        return response.request
    except RuntimeError:  # a response built by hand, never sent
        return None


def _bare_url(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


def _without_secrets(response: object) -> object:
    """A copy of ``response`` fit to leave the process: status, headers and (decoded) body,
    and a request of the same method and bare URL, without its headers."""
    if not isinstance(response, httpx.Response):
        return response
    try:
        body = response.content
    except httpx.ResponseNotRead:
        body = b""
    # The body is decoded already: the encoding and length of the wire form would be lies.
    headers = [(k, v) for k, v in response.headers.multi_items() if k not in _WIRE_HEADERS]
    sent = _sent(response)
    request = None if sent is None else httpx.Request(sent.method, _bare_url(sent.url))
    return httpx.Response(response.status_code, headers=headers, content=body, request=request)
