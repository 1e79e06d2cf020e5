# SPDX-License-Identifier: MIT
"""The retrying HTTP helpers of ``throttle.client``, sync and async, against real servers on
loopback: the simulated provider, and a scripted server for exact header and body shapes.

Nothing sleeps: the client's ``sleep`` advances a manual clock that the servers read too, so
every wait is instant, exact and checked against what the server said at that moment."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import pickle
import random
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.provider import Provider
from throttle.adaptive.upstream import DEFAULT_MAX_DELAY
from throttle.client import (
    DEFAULT_BACKOFF,
    Backoff,
    RetryBudgetExhausted,
    arequest,
    request,
    server_hint,
)
from throttle.errors import ConfigurationError, ThrottleError

WALL0 = 1_800_000_000  # the wall time (epoch seconds) when the manual clock reads 0
API_KEY = "sk-live-0123456789abcdef-SECRET"
MODES = ["sync", "async"]


class ManualTime:
    """One clock for the servers and the client: it moves only when the client sleeps (or the
    provider simulates latency), so a wait of an hour takes no time at all."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go back"
        with self._lock:
            self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)  # yield, as a real sleep would


class Top(random.Random):
    """An rng that always draws the top of the range: the waits show the jitter window."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class Answer:
    """One scripted reply; ``drop`` closes the connection without answering."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    drop: bool = False


def reply(status: int, body: object = None, **headers: str) -> Answer:
    """An answer with a JSON body (when ``body`` is given) and headers (``_`` for ``-``)."""
    fields = {name.replace("_", "-"): value for name, value in headers.items()}
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        fields.setdefault("content-type", "application/json")
    return Answer(status, fields, data)


@dataclass
class Seen:
    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedServer:
    """A tiny HTTP/1.1 server on a loopback port that answers each request with the next
    scripted :class:`Answer` (the last one repeats) and records what it was sent, and when."""

    def __init__(self, clock: ManualTime) -> None:
        self.clock = clock
        self.answers: list[Answer] = [Answer()]
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = self._chunked()
                answer = server._record(self.command, self.path, dict(self.headers), body)
                if answer.drop:
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def _chunked(self) -> bytes:
                data = b""
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/things"
        # A short poll keeps shutdown() quick: it waits for serve_forever to look up.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def script(self, *answers: Answer) -> None:
        self.answers = list(answers)

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        with self._lock:
            self.seen.append(Seen(self.clock.now, method, path, headers, body))
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@pytest.fixture
def clock() -> ManualTime:
    """A fresh manual clock at 0."""
    return ManualTime()


@pytest.fixture
def server(clock: ManualTime) -> Iterator[ScriptedServer]:
    """A scripted server on loopback reading ``clock``."""
    with ScriptedServer(clock) as scripted:
        yield scripted


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Each behaviour once through :func:`request`, once through :func:`arequest`."""
    return str(request.param)


def call(mode: str, clock: ManualTime, url: str, method: str = "POST", **kwargs: Any) -> Any:
    """One call through the sync or the async helper, sleeping on ``clock``."""
    if mode == "sync":
        with httpx.Client(trust_env=False) as client:
            return request(client, method, url, sleep=clock.sleep, wall=clock.wall, **kwargs)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await arequest(
                client, method, url, sleep=clock.asleep, wall=clock.wall, **kwargs
            )

    return asyncio.run(go())


def exhausted(mode: str, clock: ManualTime, url: str, **kwargs: Any) -> RetryBudgetExhausted:
    """The error a call that must run out of budget raises."""
    with pytest.raises(RetryBudgetExhausted) as caught:
        call(mode, clock, url, **kwargs)
    return caught.value


# -- against the simulated provider ------------------------------------------------------------

AGENTS, CALLS = 4, 6


@dataclass
class Agent:
    key: str
    statuses: list[int] = field(default_factory=list)
    answers: list[tuple[int, str | None]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


def test_agents_against_a_small_provider_all_succeed_and_never_come_back_early(
    mode: str,
) -> None:
    """Agents over capacity all end 200, never retrying before the 429's Retry-After."""
    clock = ManualTime()
    agents = [Agent(f"sk-agent-{i}-0123456789-{i:04d}") for i in range(AGENTS)]

    with Provider(capacity=2, clock=clock.monotonic, sleep=clock.advance) as provider:

        def sync_agent(agent: Agent, seed: int) -> None:
            def sleep(seconds: float) -> None:
                agent.waits.append(seconds)
                clock.advance(seconds)

            def hook(response: httpx.Response) -> None:
                agent.answers.append((response.status_code, response.headers.get("retry-after")))

            rng = random.Random(seed)
            with httpx.Client(trust_env=False, event_hooks={"response": [hook]}) as client:
                for _ in range(CALLS):
                    answer = request(
                        client, "POST", provider.url, headers={"x-api-key": agent.key},
                        json={"messages": [{"content": "hi"}]}, rng=rng, sleep=sleep,
                        wall=clock.wall,
                    )  # fmt: skip
                    agent.statuses.append(answer.status_code)

        async def async_agent(agent: Agent, seed: int) -> None:
            async def sleep(seconds: float) -> None:
                agent.waits.append(seconds)
                clock.advance(seconds)
                await asyncio.sleep(0)

            async def hook(response: httpx.Response) -> None:
                agent.answers.append((response.status_code, response.headers.get("retry-after")))

            rng = random.Random(seed)
            hooks = {"response": [hook]}
            async with httpx.AsyncClient(trust_env=False, event_hooks=hooks) as client:
                for _ in range(CALLS):
                    answer = await arequest(
                        client, "POST", provider.url, headers={"x-api-key": agent.key},
                        json={"messages": [{"content": "hi"}]}, rng=rng, sleep=sleep,
                        wall=clock.wall,
                    )  # fmt: skip
                    agent.statuses.append(answer.status_code)

        if mode == "sync":
            with ThreadPoolExecutor(AGENTS) as pool:
                list(pool.map(sync_agent, agents, range(AGENTS)))
        else:

            async def everyone() -> None:
                await asyncio.gather(*(async_agent(a, i) for i, a in enumerate(agents)))

            asyncio.run(everyone())
        log = list(provider.log)

    refusals = 0
    for agent in agents:
        assert agent.statuses == [200] * CALLS
        told = [float(ra) for status, ra in agent.answers if status == 429 and ra is not None]
        assert len(told) == len(agent.waits) == len(agent.answers) - CALLS
        assert all(wait >= ra for wait, ra in zip(agent.waits, told, strict=True))
        refusals += len(told)
        # The provider's own view: after each 429 at t, the key's next call came at t + RA.
        mine = [(t, status) for t, key, status in log if key == agent.key]
        assert [status for _, status in mine] == [status for status, _ in agent.answers]
        refused_at = [(t, next_t) for (t, s), (next_t, _) in itertools.pairwise(mine) if s == 429]
        assert all(next_t >= t + ra for (t, next_t), ra in zip(refused_at, told, strict=True))
    # The capacity did bite. Certain, whatever the interleaving: nobody sleeps before the first
    # 429, so the first agent to make its third call makes it at time 0, past a burst of 2.
    assert refusals >= 1


def test_one_agent_is_refused_exactly_where_the_capacity_ends(mode: str, clock: ManualTime) -> None:
    """With capacity 2, every third call of one agent is refused once, then admitted."""
    key = "sk-agent-solo-0123456789-abcd"
    with Provider(capacity=2, clock=clock.monotonic, sleep=clock.advance) as provider:
        for _ in range(6):
            answer = call(
                mode, clock, provider.url, headers={"x-api-key": key}, rng=random.Random(1)
            )
            assert answer.status_code == 200
        log = list(provider.log)
    assert [status for _, _, status in log] == [200, 200, 429, 200, 200, 429, 200, 200]
    assert len(clock.sleeps) == 2
    assert all(1.0 <= wait <= 1.5 for wait in clock.sleeps)  # Retry-After 1, jitter <= base


# -- the budget ---------------------------------------------------------------------------------


def test_attempts_exhausted_raise_with_the_last_response_and_no_last_sleep(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """Out of attempts: the last 429 is raised with the count, and no sleep follows it."""
    server.script(reply(429, {"error": "slow down"}, retry_after="1"))
    backoff = Backoff(max_attempts=3, base=0.0)
    error = exhausted(mode, clock, server.url, backoff=backoff)
    assert error.response.status_code == 429
    assert error.response.json() == {"error": "slow down"}
    assert error.attempts == 3
    assert error.wanted is None
    assert error.asked == 1.0
    assert clock.sleeps == [1.0, 1.0]
    assert error.waited == 2.0
    assert [s.at for s in server.seen] == [0.0, 1.0, 2.0]


def test_max_wait_exceeded_raises_before_sleeping(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A wait that would pass max_wait is not begun: raised at once, naming that wait."""
    server.script(reply(429, retry_after="10"))
    error = exhausted(mode, clock, server.url, backoff=Backoff(max_wait=15.0, base=0.0))
    assert clock.sleeps == [10.0]
    assert (error.attempts, error.waited, error.wanted) == (2, 10.0, 10.0)
    assert len(server.seen) == 2
    assert "would pass max_wait" in str(error)


def test_max_wait_of_exactly_the_total_is_allowed(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """Waits adding up to exactly max_wait are all taken; only above it is refused."""
    server.script(reply(503, retry_after="5"), reply(503, retry_after="5"), reply(200))
    answer = call(mode, clock, server.url, backoff=Backoff(max_wait=10.0, base=0.0))
    assert answer.status_code == 200
    assert clock.sleeps == [5.0, 5.0]


def test_a_single_attempt_never_retries(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """max_attempts=1 makes one try: a 429 is raised as exhausted without a sleep."""
    server.script(reply(429, retry_after="1"), reply(200))
    error = exhausted(mode, clock, server.url, backoff=Backoff(max_attempts=1))
    assert (error.attempts, error.waited, error.wanted) == (1, 0.0, None)
    assert clock.sleeps == []
    assert len(server.seen) == 1


def test_a_retry_that_succeeds_returns_the_success(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A 429 then a 200: the 200 comes back after one wait, the same body sent twice."""
    server.script(reply(429, retry_after="2"), reply(200, {"ok": True}))
    answer = call(mode, clock, server.url, content=b"payload", backoff=Backoff(base=0.0))
    assert answer.json() == {"ok": True}
    assert clock.sleeps == [2.0]
    assert [s.body for s in server.seen] == [b"payload", b"payload"]


# -- jitter -------------------------------------------------------------------------------------


def test_full_jitter_window_doubles_and_is_capped(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """Without a hint the window is min(cap, base * 2**attempt): doubling, then capped."""
    server.script(reply(503))
    backoff = Backoff(max_attempts=6, max_wait=1000.0, base=0.5, cap=4.0)
    exhausted(mode, clock, server.url, backoff=backoff, rng=Top())
    assert clock.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_with_a_seeded_rng_is_exact(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """With a seeded rng the hintless waits are exact uniform draws over their windows."""
    server.script(reply(503))
    backoff = Backoff(max_attempts=6, max_wait=1000.0, base=1.0, cap=4.0)
    exhausted(mode, clock, server.url, backoff=backoff, rng=random.Random(42))
    twin = random.Random(42)
    assert clock.sleeps == [twin.uniform(0, window) for window in (2.0, 4.0, 4.0, 4.0, 4.0)]


def test_full_jitter_stays_within_the_window() -> None:
    """A wait without a hint is never below 0 nor above its window, and spans it."""
    backoff = Backoff(base=0.25, cap=3.0)
    answer = httpx.Response(503)
    rng = random.Random(7)
    for attempt in range(1, 12):
        window = min(3.0, 0.25 * 2**attempt)
        waits = [backoff.delay(attempt, answer, rng) for _ in range(500)]
        assert all(0.0 <= wait <= window for wait in waits)
        assert max(waits) > window * 0.9  # the whole window is used, not a corner of it


def test_jitter_on_a_hint_is_added_on_top_exactly(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """Jitter over min(cap, base * 2**(n-1)) is added to a hint, never taken from it."""
    server.script(reply(429, retry_after="2"))
    backoff = Backoff(max_attempts=5, max_wait=1000.0, base=1.0, cap=3.0)
    exhausted(mode, clock, server.url, backoff=backoff, rng=random.Random(3))
    twin = random.Random(3)
    assert clock.sleeps == [2.0 + twin.uniform(0, window) for window in (1.0, 2.0, 3.0, 3.0)]
    assert all(wait >= 2.0 for wait in clock.sleeps)


# -- the body's exact retry_after ------------------------------------------------------------


def test_body_retry_after_below_the_header_is_used(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A body retry_after of 0.25 under a rounded-up Retry-After of 1 is waited."""
    server.script(reply(429, {"retry_after": 0.25}, retry_after="1"), reply(200))
    call(mode, clock, server.url, backoff=Backoff(base=0.0))
    assert clock.sleeps == [0.25]


def test_body_retry_after_without_a_header_is_used(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A JSON (or problem+json) body's retry_after counts without a Retry-After."""
    server.script(
        reply(503, {"retry_after": 3}),
        Answer(503, {"content-type": "application/problem+json"}, b'{"retry_after": 1.5}'),
        reply(200),
    )
    call(mode, clock, server.url, backoff=Backoff(base=0.0))
    assert clock.sleeps == [3.0, 1.5]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"retry_after": 5}', "application/json"),  # above the header: not believed
        (b'{"retry_after": NaN}', "application/json"),
        (b'{"retry_after": Infinity}', "application/json"),
        (b'{"retry_after": -0.5}', "application/json"),
        (b'{"retry_after": "0.5"}', "application/json"),
        (b'{"retry_after": true}', "application/json"),
        (b'{"retry_after": 0.5}', "text/plain"),  # not JSON by its type
        (b'{"retry_after": 0.5', "application/json"),  # not JSON by its text
        (b"[0.5]", "application/json"),
        (b'{"retry_after": 0.5, "pad": "' + b"x" * 70_000 + b'"}', "application/json"),
    ],
)
def test_body_retry_after_ignored_unless_a_sane_number_below_the_header(
    mode: str, clock: ManualTime, server: ScriptedServer, body: bytes, content_type: str
) -> None:
    """A body retry_after that is bad, too high or not in small JSON yields to the header."""
    server.script(Answer(429, {"retry-after": "2", "content-type": content_type}, body), reply(200))
    call(mode, clock, server.url, backoff=Backoff(base=0.0))
    assert clock.sleeps == [2.0]


# -- header shapes ------------------------------------------------------------------------------


def http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(WALL0 + offset, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": http_date(7)}, 7.0),
        ({"retry-after": http_date(-30)}, 0.0),  # a date gone by: come back now
        ({"ratelimit": '"default";r=0;t=12', "ratelimit-policy": '"default";q=100;w=60'}, 12.0),
        ({"ratelimit-remaining": "0", "ratelimit-reset": "9"}, 9.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "250ms"}, 0.25),
    ],
)
def test_the_servers_hint_in_any_dialect_is_waited_exactly(
    mode: str,
    clock: ManualTime,
    server: ScriptedServer,
    headers: dict[str, str],
    seconds: float,
) -> None:
    """Retry-After (seconds, HTTP-date), IETF RateLimit and vendor resets are waited exactly."""
    server.script(Answer(429, headers), reply(200))
    call(mode, clock, server.url, backoff=Backoff(base=0.0))
    assert clock.sleeps == [seconds]


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "soon"},
        {"retry-after": "-5"},
        {"retry-after": ""},
        {"retry-after": "Tue, 99 Foo 2026 99:99:99 GMT"},
        {"ratelimit": '"default";r=3;t=12'},  # requests left: the reset is no hint
    ],
)
def test_a_useless_hint_falls_back_to_full_jitter(
    mode: str, clock: ManualTime, server: ScriptedServer, headers: dict[str, str]
) -> None:
    """Garbage, negative or no-hint headers are ignored: the wait is full jitter."""
    server.script(Answer(429, headers), reply(200))
    call(mode, clock, server.url, backoff=Backoff(base=0.5), rng=Top())
    assert clock.sleeps == [1.0]


def test_an_enormous_retry_after_is_cut_and_refused_before_sleeping(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """An enormous Retry-After is cut to an hour, past max_wait: raised without a sleep."""
    server.script(reply(429, retry_after="99999999"))
    error = exhausted(mode, clock, server.url, backoff=Backoff(base=0.0))
    assert clock.sleeps == []
    assert (error.attempts, error.asked, error.wanted) == (1, DEFAULT_MAX_DELAY, DEFAULT_MAX_DELAY)
    assert len(server.seen) == 1


# -- what is not retried ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 404, 500, 502])
def test_other_statuses_are_returned_untouched_after_one_try(
    mode: str, clock: ManualTime, server: ScriptedServer, status: int
) -> None:
    """A status not retried (2xx, 404, 500, 502) comes back untouched after one try."""
    server.script(reply(status, {"status": status}, retry_after="1"), reply(200))
    answer = call(mode, clock, server.url)
    assert answer.status_code == status
    assert answer.json() == {"status": status}
    assert clock.sleeps == []
    assert len(server.seen) == 1


def test_custom_statuses_are_the_only_ones_retried(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """Backoff(statuses=(500,)) retries a 500 and returns a 429 as it is."""
    server.script(reply(500), reply(429, retry_after="1"), reply(200))
    answer = call(mode, clock, server.url, backoff=Backoff(statuses=(500,)), rng=Top())
    assert answer.status_code == 429
    assert clock.sleeps == [1.0]


def test_a_transport_error_propagates_unchanged(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A connection dropped without an answer raises httpx's own error, not retried."""
    server.script(Answer(drop=True), reply(200))
    with pytest.raises(httpx.RemoteProtocolError):
        call(mode, clock, server.url)
    assert clock.sleeps == []
    assert len(server.seen) == 1


# -- bodies that cannot be sent twice ----------------------------------------------------------


def chunks() -> Iterator[bytes]:
    yield b"part"


async def achunks() -> AsyncIterator[bytes]:
    yield b"part"


def test_a_streamed_body_is_refused_before_sending(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A generator as content is refused before sending, naming content."""
    stream = chunks() if mode == "sync" else achunks()
    with pytest.raises(ConfigurationError) as caught:
        call(mode, clock, server.url, content=stream)
    assert caught.value.field == "content"
    assert "bytes or str" in str(caught.value)
    assert server.seen == []


def test_an_iterator_as_data_is_refused(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """An iterator as data is refused before sending, naming data."""
    with pytest.raises(ConfigurationError) as caught:
        call(mode, clock, server.url, data=iter([b"x"]))
    assert caught.value.field == "data"
    assert server.seen == []


def test_a_streamed_body_is_allowed_when_nothing_is_retried(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """With max_attempts=1 a streamed body is sent once, as httpx would."""
    stream = chunks() if mode == "sync" else achunks()
    answer = call(mode, clock, server.url, content=stream, backoff=Backoff(max_attempts=1))
    assert answer.status_code == 200
    assert [s.body for s in server.seen] == [b"part"]


# -- Backoff -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", -1),
        ("max_attempts", 2.0),
        ("max_attempts", True),
        ("max_attempts", "5"),
        ("max_attempts", None),
        ("max_wait", -1.0),
        ("max_wait", float("nan")),
        ("max_wait", float("inf")),
        ("max_wait", True),
        ("max_wait", "60"),
        ("max_wait", 10**400),
        ("base", -0.5),
        ("base", float("nan")),
        ("base", False),
        ("cap", float("-inf")),
        ("cap", -3),
        ("cap", None),
        ("statuses", ()),
        ("statuses", []),
        ("statuses", 429),
        ("statuses", "429"),
        ("statuses", (429, "503")),
        ("statuses", (200,)),
        ("statuses", (302, 429)),
        ("statuses", (600,)),
        ("statuses", (True,)),
        ("statuses", (429.0,)),
        ("statuses", {429: 1}),
    ],
)
def test_backoff_rejects_a_bad_value_naming_the_field(name: str, value: object) -> None:
    """A bad Backoff value is a ConfigurationError naming Backoff.<field> and the forms."""
    with pytest.raises(ConfigurationError) as caught:
        Backoff(**{name: value})  # type: ignore[arg-type]
    assert caught.value.field == f"Backoff.{name}"
    assert caught.value.accepted
    assert isinstance(caught.value, ValueError)
    assert len(str(caught.value)) < 300  # a huge value is not echoed whole


def test_backoff_defaults_and_normal_forms() -> None:
    """Defaults are as documented; numbers become floats, statuses a tuple without repeats."""
    assert Backoff(5, 60.0, 0.5, 30.0, (429, 503)) == DEFAULT_BACKOFF
    given = Backoff(max_wait=60, base=0, cap=1, statuses=[503, 429, 503])  # type: ignore[arg-type]
    assert (given.max_wait, given.base, given.cap) == (60.0, 0.0, 1.0)
    assert isinstance(given.max_wait, float)
    assert given.statuses == (503, 429)
    assert hash(Backoff(statuses=frozenset({503, 429}))) == hash(Backoff())  # type: ignore[arg-type]


def test_backoff_is_frozen() -> None:
    """A policy cannot be changed after it is checked."""
    with pytest.raises(AttributeError):
        DEFAULT_BACKOFF.max_attempts = 0  # type: ignore[misc]


@pytest.mark.parametrize("attempt", [0, -1, 1.0, True, None])
def test_delay_rejects_an_attempt_that_is_not_a_count(attempt: object) -> None:
    """delay() counts tries from 1; anything else is an error naming attempt."""
    with pytest.raises(ConfigurationError) as caught:
        Backoff().delay(attempt, httpx.Response(429), random.Random())  # type: ignore[arg-type]
    assert caught.value.field == "attempt"


def test_delay_past_a_thousand_doublings_is_the_cap() -> None:
    """An attempt far past float range gives the capped window, not an OverflowError."""
    assert Backoff(cap=9.0).delay(5000, httpx.Response(503), Top()) == 9.0


def test_delay_of_a_hand_built_response_reads_headers_and_body() -> None:
    """delay() and server_hint() read any httpx.Response, HTTP-dates against now."""
    dated = httpx.Response(429, headers={"retry-after": http_date(30)})
    assert server_hint(dated, now=WALL0) == 30.0
    assert Backoff(base=0.0).delay(1, dated, random.Random(), now=WALL0 + 10) == 20.0
    exact = httpx.Response(429, headers={"retry-after": "1"}, json={"retry_after": 0.4})
    assert server_hint(exact) == 0.4
    assert server_hint(httpx.Response(429)) is None


def test_request_rejects_something_that_is_not_a_backoff(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """A backoff that is not a Backoff is refused before anything is sent."""
    with pytest.raises(ConfigurationError) as caught:
        call(mode, clock, server.url, backoff={"max_attempts": 3})
    assert caught.value.field == "backoff"
    assert server.seen == []


# -- the error ---------------------------------------------------------------------------------


def test_the_error_names_the_call_but_holds_no_secret(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """The message names call, status, tries, wait and hint; never a key from headers or URL."""
    server.script(reply(429, {"retry_after": 0.5}, retry_after="1"))
    url = server.url.replace("http://", "http://user:pw-SECRET@") + "?api_key=q-SECRET&x=1"
    error = exhausted(
        mode, clock, url, headers={"Authorization": f"Bearer {API_KEY}", "x-api-key": API_KEY},
        backoff=Backoff(max_attempts=3, base=0.0),
    )  # fmt: skip
    assert server.seen[0].headers["x-api-key"] == API_KEY  # it was sent
    message = str(error)
    for text in (message, repr(error), str(error.args)):
        assert "SECRET" not in text
        assert "0123456789abcdef" not in text
    assert message == (
        f"POST {server.url} was refused with 429 Too Many Requests after 3 attempts and 1 s "
        "of waiting (the server asked to wait 0.5 s): no attempts left"
    )
    assert isinstance(error, ThrottleError)
    assert error.status_code == 429


def test_the_error_of_a_hand_built_response_says_what_it_can() -> None:
    """An error over a response never sent names no target and still formats."""
    error = RetryBudgetExhausted(httpx.Response(499), 1, 0.0, 12.5, None)
    assert str(error) == (
        "the request was refused with 499 after 1 attempt and 0 s of waiting "
        "(the server gave no delay): the next wait of 12.5 s would pass max_wait"
    )


def test_a_pickled_error_leaves_the_request_secrets_behind(
    mode: str, clock: ManualTime, server: ScriptedServer
) -> None:
    """Pickled, the error keeps the response but not the request's headers or query."""
    body = gzip.compress(json.dumps({"retry_after": 0.5}).encode())
    headers = {"retry-after": "1", "content-type": "application/json", "content-encoding": "gzip"}
    server.script(Answer(429, headers, body))
    error = exhausted(
        mode, clock, server.url + "?api_key=q-SECRET", headers={"x-api-key": API_KEY},
        backoff=Backoff(max_attempts=2, base=0.0),
    )  # fmt: skip
    data = pickle.dumps(error)
    assert b"SECRET" not in data
    copy = pickle.loads(data)
    assert type(copy) is RetryBudgetExhausted
    assert str(copy) == str(error)
    assert (copy.attempts, copy.waited, copy.wanted, copy.asked) == (2, 0.5, None, 0.5)
    assert copy.response.status_code == 429
    assert copy.response.json() == {"retry_after": 0.5}
    assert copy.response.headers["retry-after"] == "1"
    assert "x-api-key" not in copy.response.request.headers
    assert copy.response.request.url == server.url


def test_an_error_rebuilt_from_a_json_result_still_formats() -> None:
    """Rebuilt from a JSON result backend (response as repr), the error still formats."""
    error = RetryBudgetExhausted("<Response [429 Too Many Requests]>", 2, 1.0)  # type: ignore[arg-type]
    assert str(error) == (
        "the request was refused with <Response [429 Too Many Requests]> after 2 attempts and "
        "1 s of waiting (the server gave no delay): no attempts left"
    )
