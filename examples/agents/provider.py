# SPDX-License-Identifier: MIT
"""A SIMULATED LLM provider on loopback: not a real API, no model behind it.

A small HTTP server that answers ``POST /v1/chat/completions`` as an LLM provider's rate
limits would: each API key (``Authorization: Bearer <key>`` or ``x-api-key``) has a hidden
capacity of C requests per second (a token bucket of its own, burst C). Below it the answer is
200 after a simulated latency, with token usage (prompt tokens from the text sent, completion
tokens drawn up to ``max_tokens``); above it, at once, 429 with ``Retry-After`` (whole seconds,
rounded up). Both carry ``x-ratelimit-{limit,remaining,reset}-requests`` headers.

``GET /stats`` reports what it answered, by key hint (``sk-…abcd``: never a whole key), with a
log of (time on its clock, hint, status) from an offset (``/stats?since=N``).

Run on its own: ``python -m examples.agents.provider --port 8400 --capacity 4 --latency 0.3``
(it prints its URL first; ``--capacity-for abcd=2`` gives the key ending in ``abcd`` a capacity
of its own). The test suite and the benchmarks use :class:`Provider` in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

BANNER = "SIMULATED LLM provider (no model, not a real API)"
PATH = "/v1/chat/completions"


def key_hint(key: str) -> str:
    """What may be shown of an API key: its last four characters."""
    return "…" + key[-4:]


class Provider:
    """``with Provider(capacity=20) as p: httpx.post(p.url, headers={"x-api-key": k})``.

    ``capacities`` overrides ``capacity`` for single keys, named whole or by their hint
    (:func:`key_hint`). ``latency`` seconds (plus up to
    ``jitter`` more, drawn from ``seed``) pass before a 200; 429s are answered at once.
    ``clock`` (monotonic seconds) and ``sleep`` are the simulated service's own time, not the
    library's.
    """

    def __init__(
        self,
        capacity: float,
        *,
        capacities: Mapping[str, float] | None = None,
        latency: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.capacity = capacity
        self.capacities = dict(capacities or {})
        self.latency = latency
        self.jitter = jitter
        self.clock = clock
        self.sleep = sleep
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self.answers: Counter[tuple[str, int]] = Counter()  # (api key, status) -> count
        self.log: list[tuple[float, str, int]] = []  # (time, api key, status)
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                status, headers, answer = provider._answer(_api_key(self.headers), body)
                self._send(status, headers, answer)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/stats":
                    self._send(404, {}, {"error": {"type": "not_found"}})
                    return
                since = parse_qs(url.query).get("since", ["0"])[0]
                self._send(200, {}, provider.stats(int(since) if since.isdigit() else 0))

            def _send(self, status: int, headers: Mapping[str, str], body: object) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                data = json.dumps(body).encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}{PATH}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _answer(self, key: str, body: bytes = b"") -> tuple[int, dict[str, str], dict[str, Any]]:
        capacity = self.capacities.get(key) or self.capacities.get(key_hint(key), self.capacity)
        interval = 1.0 / capacity
        with self._lock:
            now = self.clock()
            tat = max(self._tat.get(key, now), now)
            # Burst C: admitted while the bucket's debt stays within one second.
            if tat + interval - now <= 1.0 + 1e-9:
                self._tat[key] = tat + interval
                status = 200
            else:
                status = 429
            wait = max(0.0, tat + interval - 1.0 - now)
            self.answers[(key, status)] += 1
            self.log.append((now, key, status))
            draw = self._random.random()
        left = max(0, math.floor((1.0 - (max(tat, now) - now)) * capacity))
        headers = {
            "x-ratelimit-limit-requests": str(int(capacity)),
            "x-ratelimit-remaining-requests": str(left if status == 200 else 0),
            "x-ratelimit-reset-requests": f"{int(wait * 1000)}ms",
        }
        if status == 429:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            return status, headers, {"error": {"type": "rate_limit_error"}, "simulated": True}
        delay = self.latency + self.jitter * draw
        if delay > 0:
            self.sleep(delay)
        return status, headers, {"usage": _usage(body, draw), "simulated": True}

    def count(self, key: str, status: int) -> int:
        with self._lock:
            return self.answers[(key, status)]

    def stats(self, since: int = 0) -> dict[str, Any]:
        """Answers by key hint and status, and the log from entry ``since`` on."""
        with self._lock:
            counts: dict[str, dict[str, int]] = {}
            for (key, status), n in self.answers.items():
                by_status = counts.setdefault(key_hint(key), {})
                by_status[str(status)] = by_status.get(str(status), 0) + n
            log = [(t, key_hint(key), status) for t, key, status in self.log[since:]]
            return {
                "simulated": True,
                "now": self.clock(),
                "answers": counts,
                "log": log,
                "next": since + len(log),
            }

    def __enter__(self) -> Provider:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()


def _api_key(headers: Any) -> str:
    bearer = headers.get("authorization") or ""
    if bearer.lower().startswith("bearer "):
        return str(bearer[7:].strip())
    return str(headers.get("x-api-key") or "-")


def _usage(body: bytes, draw: float) -> dict[str, int]:
    """Token usage for a request: about four characters a prompt token, and a completion of
    between a quarter of ``max_tokens`` and all of it."""
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        request = {}
    if not isinstance(request, dict):
        request = {}
    messages = request.get("messages")
    text = (
        "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        if isinstance(messages, list)
        else ""
    )
    max_tokens = request.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = 64
    prompt = math.ceil(len(text) / 4)
    completion = max(1, round(max_tokens * (0.25 + 0.75 * draw)))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=BANNER)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=8400, help="0 picks a free port")
    parser.add_argument("--capacity", type=float, default=4.0, help="requests/s per API key")
    parser.add_argument(
        "--capacity-for",
        action="append",
        default=[],
        metavar="LAST4=N",
        help="another capacity for the key ending in LAST4 (repeatable)",
    )
    parser.add_argument("--latency", type=float, default=0.3, help="seconds before a 200")
    parser.add_argument("--jitter", type=float, default=0.4, help="up to this much more")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    capacities = {}
    for item in args.capacity_for:
        last4, _, value = item.partition("=")
        capacities[key_hint(last4)] = float(value)
    provider = Provider(
        args.capacity,
        capacities=capacities,
        latency=args.latency,
        jitter=args.jitter,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    print(f"{BANNER} listening on {provider.url}", flush=True)
    try:
        provider.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        provider.server.server_close()


if __name__ == "__main__":
    main()
