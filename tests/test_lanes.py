# SPDX-License-Identifier: MIT
"""``make test``'s second pass runs the tests that start worker processes in two lanes at once,
by ``BUSY_TESTS`` (``tests/conftest.py``): a name there that no longer names a test would move
that test to the light lane unnoticed, beside the other busy ones. Checked from the source,
without importing the test modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import BUSY_TESTS

ROOT = Path(__file__).resolve().parent.parent


def process_tests() -> list[str]:
    """The files of the Makefile's ``PROCESS_TESTS`` (continued over several lines)."""
    text = (ROOT / "Makefile").read_text()
    found = re.search(r"^PROCESS_TESTS :=((?:.*\\\n)*.*)$", text, re.MULTILINE)
    assert found, "the Makefile defines no PROCESS_TESTS"
    return found.group(1).replace("\\\n", " ").split()


def test_every_process_test_file_exists() -> None:
    files = process_tests()
    assert len(files) == len(set(files))
    for name in files:
        assert (ROOT / name).is_file(), name


def test_every_busy_test_is_a_process_test_that_exists() -> None:
    files = set(process_tests())
    for entry in BUSY_TESTS:
        path, _, function = entry.partition("::")
        assert path in files, f"{entry}: not among the Makefile's PROCESS_TESTS"
        if function:
            tree = ast.parse((ROOT / path).read_text())
            names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert function in names, f"{entry}: no such test"
