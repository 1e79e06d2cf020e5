# SPDX-License-Identifier: MIT
"""What the benchmark scripts share: the Redis server they measure against, and one table
form for their results, as text or Markdown."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def redis_server(given: str | None) -> Iterator[tuple[str, str]]:
    """The server to run against (``--redis-url``, else a private redis-server started for
    the run), and a description of it."""
    if given:
        yield given, "given by --redis-url"
        return
    # The private server helper lives in the test package, at the repository root.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.redis_servers import RedisServer

    with RedisServer() as server:
        yield server.url, "private redis-server started for this run"


def table(rows: Sequence[Sequence[str]], markdown: bool, right: Sequence[bool]) -> str:
    """``rows[0]`` is the header; ``right`` says which columns are right-aligned (numbers)."""
    head, *body = rows
    if markdown:
        lines = ["| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
