# SPDX-License-Identifier: MIT
"""Booking ids and deferral tokens: unique, well formed, and never repeated across a fork."""

from __future__ import annotations

import os
import re

from throttle._tokens import token_hex, token_urlsafe


def test_tokens_are_well_formed_and_unique() -> None:
    hexes = [token_hex(8) for _ in range(5000)]  # more than one refill of the buffer
    assert all(re.fullmatch(r"[0-9a-f]{16}", t) for t in hexes)
    assert len(set(hexes)) == len(hexes)
    ids = [token_urlsafe(12) for _ in range(5000)]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", t) for t in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_tokens() -> None:
    token_hex(8)  # the buffer is filled and partly used before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next tokens and leave at once
        os.write(write, " ".join(token_hex(8) for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [token_hex(8) for _ in range(4)]
    assert len(child) == 4
    assert not set(child) & set(parent)
