# SPDX-License-Identifier: MIT
"""Run every benchmark and rewrite README.md's result sections from their output (``make bench``).

    python benchmarks/readme.py [--quick] [--only NAME] [--readme PATH] [--dry-run]

Each benchmark (``benchmarks/decision.py``, ``gate.py``, ``adaptive.py``, ``edge.py``) runs with
``--markdown``, one after the other (they measure the machine: never in parallel), its output
echoed as it comes. Only when all of them have succeeded is the README read again and the text
between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` replaced with each one's output,
shaped for the page: progress lines dropped, the machine line and table captions as
paragraphs, the adaptive benchmark's per-second series thinned as the page shows them, and the
plain-text summary after the last table (throughput, goals, total time) in a code block.
Nothing outside the markers changes; a missing marker is an error naming it, raised before any
benchmark runs. A failed benchmark leaves the README untouched.

``--dry-run`` prints the new sections instead of writing; ``--outputs DIR`` keeps each
benchmark's raw output as ``DIR/NAME.txt``, and with ``--render-only`` the README is rewritten
from those files without running anything.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

#: The benchmarks, in the order they run, by the name their README markers use.
BENCHMARKS: dict[str, str] = {
    "decision": "decision.py",
    "gate": "gate.py",
    "adaptive": "adaptive.py",
    "edge": "edge.py",
}


class MarkerError(ValueError):
    """The README lacks a section's markers, has them twice, or in the wrong order."""


# -- the markers --------------------------------------------------------------------------------


def start_marker(name: str) -> str:
    return f"<!-- bench:{name} -->"


def end_marker(name: str) -> str:
    return f"<!-- /bench:{name} -->"


def find_section(text: str, name: str) -> tuple[int, int]:
    """The span of the text between ``name``'s markers (markers excluded)."""
    start, end = start_marker(name), end_marker(name)
    for marker in (start, end):
        count = text.count(marker)
        if count == 0:
            raise MarkerError(f"the README has no {marker} marker")
        if count > 1:
            raise MarkerError(f"the README has the {marker} marker {count} times")
    begin = text.index(start) + len(start)
    finish = text.index(end)
    if finish < begin:
        raise MarkerError(f"{end} comes before {start} in the README")
    return begin, finish


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``name``'s markers replaced by ``body`` on lines of its
    own; everything else, the markers included, unchanged."""
    begin, finish = find_section(text, name)
    body = body.strip("\n")
    return f"{text[:begin]}\n{body}\n{text[finish:]}"


def replace_sections(text: str, bodies: Mapping[str, str]) -> str:
    """Every section of ``bodies`` replaced (all markers are checked before any change)."""
    for name in bodies:
        find_section(text, name)
    for name, body in bodies.items():
        text = replace_section(text, name, body)
    return text


def rewrite_file(path: Path, bodies: Mapping[str, str]) -> bool:
    """Rewrite the sections of ``bodies`` in the file at ``path`` (atomically, by rename);
    return whether anything changed."""
    old = path.read_text(encoding="utf-8")
    new = replace_sections(old, bodies)
    if new == old:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(new)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


# -- shaping a benchmark's output for the page --------------------------------------------------


@dataclass(frozen=True)
class Thinning:
    """Keep only some rows of the table whose caption matches ``caption``: ``keep(first cell,
    caption match)``; ``title(match)`` is the caption the page shows instead."""

    caption: re.Pattern[str]
    keep: Callable[[float, re.Match[str]], bool]
    title: Callable[[re.Match[str]], str]


def _around_load(second: float, match: re.Match[str]) -> bool:
    start = float(match["start"])
    return second % 3 == 0 or start <= second <= start + 3


#: The long per-second series the page shows thinned, by benchmark.
THINNING: dict[str, tuple[Thinning, ...]] = {
    "adaptive": (
        Thinning(
            re.compile(r"^Per second:$"),
            lambda second, _: second < 2 or second % 5 == 0,
            lambda _: "Per second (every fifth second):",
        ),
        Thinning(
            re.compile(r"^Worker load \(busy from (?P<start>[\d.]+) s to (?P<end>[\d.]+) s\):$"),
            _around_load,
            lambda m: (
                f"Worker load (busy from {m['start']} s to {m['end']} s), every third second "
                "and around the start of the load:"
            ),
        ),
    ),
}

#: A benchmark's progress line ("latency: 5 rounds x 2,000 calls ...", "2. load: ... ...").
_PROGRESS = re.compile(r"\s\.\.\.$|^Plot: ")


def _is_table(line: str) -> bool:
    return line.startswith("|")


def thin(lines: Sequence[str], rules: Iterable[Thinning]) -> list[str]:
    """Apply the thinning rules to the table right after each matching caption line."""
    out: list[str] = []
    rule: Thinning | None = None
    match: re.Match[str] | None = None
    rows = 0  # table lines seen under the current caption
    rules = tuple(rules)
    for line in lines:
        if not _is_table(line):
            rule, match, rows = None, None, 0
            for candidate in rules:
                if found := candidate.caption.match(line):
                    rule, match = candidate, found
                    line = candidate.title(found)
                    break
            out.append(line)
            continue
        rows += 1
        if rule is not None and match is not None and rows > 2:  # header and rule line stay
            first = line.strip("|").split("|")[0].strip()
            try:
                if not rule.keep(float(first), match):
                    continue
            except ValueError:
                pass
        out.append(line)
    return out


def render(name: str, output: str) -> str:
    """A benchmark's ``--markdown`` output as the README shows it: the machine line (the first
    line); each table with its caption (the lines right above it) and its note (the lines right
    under it) as paragraphs; everything after the last table in one code block. Anything else
    before the last table is progress and is left out."""
    lines = [line.rstrip() for line in output.splitlines()]
    lines = [line for line in lines if not _PROGRESS.search(line)]
    lines = thin(lines, THINNING.get(name, ()))
    if not lines:
        return ""
    blocks: list[list[str]] = [[lines[0]]] if not _is_table(lines[0]) else []
    done = len(blocks)  # lines consumed so far
    i = done
    while i < len(lines):
        if not _is_table(lines[i]):
            i += 1
            continue
        top = i
        while top > done and lines[top - 1].strip() and not _is_table(lines[top - 1]):
            top -= 1
        bottom = i
        while bottom < len(lines) and _is_table(lines[bottom]):
            bottom += 1
        note = bottom
        while note < len(lines) and lines[note].strip() and not _is_table(lines[note]):
            note += 1
        blocks += [part for part in (lines[top:i], lines[i:bottom], lines[bottom:note]) if part]
        done = i = note
    parts = ["\n".join(block) for block in blocks]
    summary = _squeeze(lines[done:])
    if summary:
        parts.append("```\n" + "\n".join(summary) + "\n```")
    return "\n\n".join(parts)


def _squeeze(lines: Sequence[str]) -> list[str]:
    """Leading and trailing blank lines dropped, runs of them made one."""
    out: list[str] = []
    for line in lines:
        if line.strip() or (out and out[-1]):
            out.append(line if line.strip() else "")
    while out and not out[-1]:
        out.pop()
    return out


# -- running the benchmarks ---------------------------------------------------------------------


def run(name: str, extra: Sequence[str]) -> str:
    """Run one benchmark with ``--markdown``; echo and return its standard output."""
    command = [sys.executable, str(HERE / BENCHMARKS[name]), "--markdown", *extra]
    print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        captured = []
        for line in proc.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            captured.append(line)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark {name} failed (exit {proc.returncode}): README untouched")
    return "".join(captured)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="file to rewrite")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--redis-url", help="pass --redis-url to every benchmark (FLUSHED)")
    parser.add_argument("--dry-run", action="store_true", help="print the sections, write nothing")
    parser.add_argument("--outputs", type=Path, help="keep the raw outputs here as NAME.txt")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: render the outputs kept in --outputs",
    )
    args = parser.parse_args(argv)
    if args.render_only and args.outputs is None:
        parser.error("--render-only needs --outputs DIR")
    names = args.only or list(BENCHMARKS)
    extra = [
        *(["--quick"] if args.quick else []),
        *(["--redis-url", args.redis_url] if args.redis_url else []),
    ]

    # Fail before minutes of benchmarks, not after them.
    text = args.readme.read_text(encoding="utf-8")
    for name in names:
        find_section(text, name)

    outputs: dict[str, str] = {}
    for name in names:
        if args.render_only:
            outputs[name] = (args.outputs / f"{name}.txt").read_text(encoding="utf-8")
            continue
        outputs[name] = run(name, extra)
        if args.outputs is not None:
            args.outputs.mkdir(parents=True, exist_ok=True)
            (args.outputs / f"{name}.txt").write_text(outputs[name], encoding="utf-8")
    bodies = {name: render(name, output) for name, output in outputs.items()}

    if args.dry_run:
        for name, body in bodies.items():
            print(f"{start_marker(name)}\n{body}\n{end_marker(name)}\n")
        return 0
    # Read again: the README may have been edited while the benchmarks ran.
    changed = rewrite_file(args.readme, bodies)
    print(
        f"{args.readme}: {'rewrote' if changed else 'unchanged'} {', '.join(names)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
