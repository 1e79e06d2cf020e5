# SPDX-License-Identifier: MIT
"""benchmarks/readme.py: the README's benchmark sections are rewritten between their markers
only, a missing marker is named, a rewrite is idempotent, and a benchmark's output is shaped
as the page shows it. No benchmark runs here (they take minutes): outputs are given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import readme

ROOT = Path(__file__).resolve().parent.parent

PAGE = """# Title

Text before, with a <!-- comment --> of its own.

<!-- bench:decision -->
old decision table
<!-- /bench:decision -->

Between the sections: **kept**.

<!-- bench:gate -->
old gate table
<!-- /bench:gate -->

<!-- bench:adaptive -->
<!-- /bench:adaptive -->
Text after.
"""

DECISION = """\
Redis 7.0.15 (private redis-server, redis://127.0.0.1:1/0); Python 3.11.7; 2 CPUs
FLUSHALL; creating the buckets of 5,000 identities ...
latency: 5 rounds x 400 calls ...
throughput ...

Latency of one call: median over 5 rounds.
| contender | p50 us |
|---|---:|
| floor | 40.7 |
| throttle | 81.4 |
(the keyspace held 10,000 keys)

Throughput, 4 processes x 500 calls:
  throttle admit (2 limits):     11,401 admissions/s


Goals:
  FAIL  two-limit admission (1,000 keys) <= 1.1x floor: 2.25x
  PASS  <= 200 bytes per bucket: 120.8

total time 7 s
"""

GATE = """\
Redis 7.0.15 (private redis-server, redis://127.0.0.1:1/0); Python 3.11.7; 2 CPUs
1. overhead: 5 rounds x 200 tasks of each kind ...
  round 1: gated 629/s, ungated 967/s
  round 2: gated 331/s, ungated 845/s
2. throttle 1/s burst 10: 30 s window ...
3. backlog: 2,000 tasks at 50/s ...

| part | measure | throttle |
|---|---|---:|
| 1 overhead | gated / ungated | 0.94 |

Goals:
  PASS  overhead: gated / ungated throughput >= 0.9: 0.94

total time 120 s (overhead 25 s, windows 31 s, backlog 64 s)
"""

ADAPTIVE = """\
Redis at private redis-server started for this run; Python 3.11.7; 2 CPUs
1. static: 30 s against the simulated provider ...
2. load: quiet, then one busy process per CPU, then quiet ...

Upstream feedback (after the first 10 s):
| run | goodput/s |
|---|---:|
| static | 20.0 |

Per second:
| second | static 200/429 |
|---:|---:|
{per_second}

Worker load (busy from 10 s to 30 s):
| second | admitted | factor |
|---:|---:|---:|
{load}

Plot: /tmp/adaptive.png

Goals:
  PASS  feedback goodput >= 90% of C: 100%

total time 120 s
""".format(
    per_second="\n".join(f"| {i} | 20/0 |" for i in range(12)),
    load="\n".join(f"| {i} | 40 | 1.00 |" for i in range(16)),
)


def write(tmp_path: Path, text: str = PAGE) -> Path:
    path = tmp_path / "README.md"
    path.write_text(text)
    return path


def test_a_section_is_replaced_and_the_rest_of_the_file_is_kept(tmp_path: Path) -> None:
    """Only the text between a section's markers changes; the markers and everything outside
    them stay byte for byte."""
    path = write(tmp_path)
    assert readme.rewrite_file(path, {"gate": "| new | table |\n|---|---|"})
    new = path.read_text()
    before, after = PAGE.split("old gate table\n")
    assert new == before + "| new | table |\n|---|---|\n" + after


def test_two_runs_are_idempotent(tmp_path: Path) -> None:
    """Rewriting with the same output twice leaves the file as the first rewrite left it (and
    says it changed nothing), whatever blank lines the output starts or ends with."""
    path = write(tmp_path)
    bodies = {"decision": "\n\nnew decision\n\n", "adaptive": "new adaptive"}
    assert readme.rewrite_file(path, bodies)
    once = path.read_bytes()
    assert not readme.rewrite_file(path, bodies)
    assert path.read_bytes() == once
    assert readme.replace_sections(once.decode(), bodies) == once.decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PAGE.replace("<!-- bench:gate -->\n", ""), "no <!-- bench:gate --> marker"),
        (PAGE.replace("<!-- /bench:gate -->\n", ""), "no <!-- /bench:gate --> marker"),
        (PAGE + "<!-- bench:gate -->\n", "<!-- bench:gate --> marker 2 times"),
        (
            PAGE.replace("<!-- bench:gate -->", "@@")
            .replace("<!-- /bench:gate -->", "<!-- bench:gate -->")
            .replace("@@", "<!-- /bench:gate -->"),
            "<!-- /bench:gate --> comes before <!-- bench:gate -->",
        ),
    ],
)
def test_a_missing_or_misplaced_marker_is_named_and_nothing_is_written(
    tmp_path: Path, text: str, message: str
) -> None:
    """A missing, doubled or reversed marker raises an error naming it, and the file is left
    as it was, even for the sections whose markers are fine."""
    path = write(tmp_path, text)
    with pytest.raises(readme.MarkerError, match=message):
        readme.rewrite_file(path, {"decision": "new", "gate": "new"})
    assert path.read_text() == text


def test_the_real_readme_has_every_benchmarks_markers() -> None:
    """README.md has one pair of markers, in order, for every benchmark ``make bench`` runs."""
    text = (ROOT / "README.md").read_text()
    for name in readme.BENCHMARKS:
        readme.find_section(text, name)


def test_output_is_shaped_as_the_page_shows_it() -> None:
    """Progress lines go; the machine line, captions, tables and the note under the last table
    are paragraphs; what follows the last table is one code block with single blank lines."""
    body = readme.render("decision", DECISION)
    assert body == (
        "Redis 7.0.15 (private redis-server, redis://127.0.0.1:1/0); "
        "Python 3.11.7; 2 CPUs\n"
        "\n"
        "Latency of one call: median over 5 rounds.\n"
        "\n"
        "| contender | p50 us |\n|---|---:|\n| floor | 40.7 |\n| throttle | 81.4 |\n"
        "\n"
        "(the keyspace held 10,000 keys)\n"
        "\n"
        "```\n"
        "Throughput, 4 processes x 500 calls:\n"
        "  throttle admit (2 limits):     11,401 admissions/s\n"
        "\n"
        "Goals:\n"
        "  FAIL  two-limit admission (1,000 keys) <= 1.1x floor: 2.25x\n"
        "  PASS  <= 200 bytes per bucket: 120.8\n"
        "\n"
        "total time 7 s\n"
        "```"
    )


def test_progress_lines_before_a_table_without_caption_are_left_out() -> None:
    """The gate benchmark's progress (numbered steps, indented per-round lines) is not shown;
    its table has no caption, and its goals and total time form the code block."""
    assert readme.render("gate", GATE) == (
        "Redis 7.0.15 (private redis-server, redis://127.0.0.1:1/0); Python 3.11.7; 2 CPUs\n"
        "\n"
        "| part | measure | throttle |\n|---|---|---:|\n| 1 overhead | gated / ungated | 0.94 |\n"
        "\n"
        "```\n"
        "Goals:\n"
        "  PASS  overhead: gated / ungated throughput >= 0.9: 0.94\n"
        "\n"
        "total time 120 s (overhead 25 s, windows 31 s, backlog 64 s)\n"
        "```"
    )


def test_the_adaptive_series_are_thinned_as_on_the_page() -> None:
    """The per-second series keeps seconds 0, 1 and every fifth; the load series every third
    second and the four from the start of the load; captions say so; the plot line goes."""
    body = readme.render("adaptive", ADAPTIVE)
    assert "Per second (every fifth second):" in body
    seconds = [line.split("|")[1].strip() for line in body.splitlines() if "20/0" in line]
    assert seconds == ["0", "1", "5", "10"]
    assert (
        "Worker load (busy from 10 s to 30 s), every third second and around the start of the load:"
    ) in body
    load = [line.split("|")[1].strip() for line in body.splitlines() if "| 40 | 1.00 |" in line]
    assert load == ["0", "3", "6", "9", "10", "11", "12", "13", "15"]
    assert "Plot:" not in body
    assert "| static | 20.0 |" in body
    assert body.endswith(
        "Goals:\n  PASS  feedback goodput >= 90% of C: 100%\n\ntotal time 120 s\n```"
    )


def test_the_command_rewrites_a_copy_from_kept_outputs(tmp_path: Path) -> None:
    """``readme.py --render-only --outputs DIR --readme COPY`` rewrites the copy's sections
    from the kept outputs, runs no benchmark, and a second run changes nothing."""
    path = write(tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "decision.txt").write_text(DECISION)
    (outputs / "adaptive.txt").write_text(ADAPTIVE)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "readme.py"),
        "--render-only",
        "--outputs",
        str(outputs),
        "--readme",
        str(path),
        "--only",
        "decision",
        "--only",
        "adaptive",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    first = path.read_text()
    assert readme.render("decision", DECISION) in first
    assert readme.render("adaptive", ADAPTIVE) in first
    assert "old gate table" in first
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    assert path.read_text() == first


def test_a_missing_marker_stops_the_command_before_any_benchmark_runs(tmp_path: Path) -> None:
    """Without a section's markers the command fails at once, naming the marker."""
    path = write(tmp_path, PAGE.replace("<!-- /bench:adaptive -->", ""))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "readme.py"), "--readme", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "<!-- /bench:adaptive -->" in result.stderr
    assert "== " not in result.stderr  # no benchmark was started


@pytest.mark.parametrize("name", list(readme.BENCHMARKS))
def test_every_benchmark_takes_the_options_the_command_passes(name: str) -> None:
    """Each benchmark script accepts ``--markdown``, ``--quick`` and ``--redis-url``."""
    script = ROOT / "benchmarks" / readme.BENCHMARKS[name]
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for flag in ("--markdown", "--quick", "--redis-url"):
        assert flag in result.stdout, (name, flag)
