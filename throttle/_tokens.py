# SPDX-License-Identifier: MIT
"""Unguessable tokens (booking ids, deferral tokens) without a system call each.

Every admission of a throttled task needs two of them. ``secrets`` reads the kernel's random
source on every call; here the same source is read for a batch of tokens at a time, encoded in
one go and handed out one by one. No two tokens share a byte of randomness. A forked child
throws away what its parent had left, so it never repeats its parent's tokens.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

__all__ = ["token_hex", "token_urlsafe"]

_BATCH = 3072  # random bytes read at a time, at most (a multiple of 3: base64 without padding)


def _urlsafe(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _Tokens:
    """Tokens of ``nbytes`` random bytes, ``encode``d into ``width`` characters each (and every
    run of them into the run of their encodings, as hex and base64 of 3-byte groups do)."""

    def __init__(self, nbytes: int, encode: Callable[[bytes], str], width: int) -> None:
        self._nbytes, self._encode, self._width = nbytes, encode, width
        self._left: list[str] = []
        os.register_at_fork(after_in_child=self._left.clear)

    def take(self) -> str:
        try:
            return self._left.pop()  # atomic: threads never get the same token
        except IndexError:
            pass
        text = self._encode(os.urandom(_BATCH // self._nbytes * self._nbytes))
        width = self._width
        batch = [text[i : i + width] for i in range(0, len(text), width)]
        token = batch.pop()
        self._left.extend(batch)  # another thread's batch may land too: they never overlap
        return token


_booking_ids = _Tokens(12, _urlsafe, 16)
_deferral_tokens = _Tokens(8, bytes.hex, 16)


def token_urlsafe(nbytes: int) -> str:
    """Like :func:`secrets.token_urlsafe`: ``nbytes`` random bytes, base64url, no padding."""
    if nbytes == 12:
        return _booking_ids.take()
    return _urlsafe(os.urandom(nbytes))


def token_hex(nbytes: int) -> str:
    """Like :func:`secrets.token_hex`: ``nbytes`` random bytes as hex digits."""
    if nbytes == 8:
        return _deferral_tokens.take()
    return os.urandom(nbytes).hex()
