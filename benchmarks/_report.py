# SPDX-License-Identifier: MIT
"""How the benchmark scripts print their results: one table form, as text or Markdown."""

from __future__ import annotations

from collections.abc import Sequence


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
