# SPDX-License-Identifier: MIT
"""A SIMULATED LLM provider on loopback, for tests and benchmarks: a small HTTP server with a
hidden capacity of C requests per second per API key (a token bucket of its own, burst C),
answering 200 with token usage below it and 429 with ``Retry-After`` (whole seconds, rounded
up) and ``x-ratelimit-*`` headers above it. It counts what it answered."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class Provider:
    """``with Provider(capacity=20) as p: httpx.post(p.url, headers={"x-api-key": k})``.

    ``clock`` is the provider's own (monotonic seconds): it is the simulated service's time,
    not the library's."""

    def __init__(self, capacity: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self.answers: Counter[tuple[str, int]] = Counter()  # (api key, status) -> count
        self.log: list[tuple[float, str, int]] = []  # (time, api key, status)
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                key = self.headers.get("x-api-key") or "-"
                status, headers, body = provider._answer(key)
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _answer(self, key: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        interval = 1.0 / self.capacity
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
        left = max(0, math.floor((1.0 - (max(tat, now) - now)) * self.capacity))
        headers = {
            "x-ratelimit-limit-requests": str(int(self.capacity)),
            "x-ratelimit-remaining-requests": str(left if status == 200 else 0),
            "x-ratelimit-reset-requests": f"{int(wait * 1000)}ms",
        }
        if status == 429:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            return status, headers, {"error": {"type": "rate_limit_error"}}
        return status, headers, {"usage": {"total_tokens": 42}, "simulated": True}

    def count(self, key: str, status: int) -> int:
        with self._lock:
            return self.answers[(key, status)]

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
