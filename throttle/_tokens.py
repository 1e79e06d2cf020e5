# SPDX-License-Identifier: MIT
"""Unguessable tokens (booking ids, deferral tokens) without a system call each.

Every admission of a throttled task needs two of them. ``secrets`` reads the kernel's random
source on every call; here the same source is read a few kilobytes at a time and handed out in
slices. A forked child starts with an empty buffer, so it never repeats its parent's tokens.
"""

from __future__ import annotations

import base64
import os
import threading

__all__ = ["token_hex", "token_urlsafe"]

_REFILL = 4096


class _Entropy:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # a fork may have copied it locked
        self._buffer = b""
        self._at = 0

    def take(self, nbytes: int) -> bytes:
        with self._lock:
            at = self._at
            if at + nbytes > len(self._buffer):
                self._buffer, at = os.urandom(max(_REFILL, nbytes)), 0
            self._at = at + nbytes
            return self._buffer[at : at + nbytes]


_entropy = _Entropy()


def token_urlsafe(nbytes: int) -> str:
    """Like :func:`secrets.token_urlsafe`: ``nbytes`` random bytes, base64url, no padding."""
    return base64.urlsafe_b64encode(_entropy.take(nbytes)).rstrip(b"=").decode("ascii")


def token_hex(nbytes: int) -> str:
    """Like :func:`secrets.token_hex`: ``nbytes`` random bytes as hex digits."""
    return _entropy.take(nbytes).hex()
