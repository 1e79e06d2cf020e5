# SPDX-License-Identifier: MIT
"""The message headers ``throttle`` reads and writes, and the signed identity header.

A caller may pass ``headers={"throttle_identity": {"api_key": ..., "agent_id": ...}}`` for work
whose identity is not in its arguments. The publishing process replaces the raw values by
fingerprints and signs them with the key secret, bound to the task id, before the message leaves
it (``before_task_publish``); so no raw API key travels in a header, and a header copied from
another task or forged without the secret is ignored (the work is then checked under the
identity its own arguments give).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Final

from throttle.identity import Fingerprint, Keyspace

__all__ = [
    "ADMITTED",
    "BOOKING",
    "DEFERRALS",
    "IDENTITY",
    "INTERNAL",
    "TOKEN",
    "open_identity",
    "seal_identity",
]

#: The token of this copy of deferred work (see :class:`throttle.store.Guard`).
TOKEN: Final = "throttle_token"
#: The booking this copy holds.
BOOKING: Final = "throttle_booking"
#: How many times this work was deferred.
DEFERRALS: Final = "throttle_deferrals"
#: The identity given by the caller (raw until published, then sealed).
IDENTITY: Final = "throttle_identity"
#: Set by the gate on work it let through, for the pool side: the receipt to settle.
ADMITTED: Final = "throttle_admitted"
#: Headers a re-published copy must not inherit from the copy it replaces.
INTERNAL: Final = (ADMITTED, "redelivered")

_SEALED: Final = "sealed"


def seal_identity(raw: Mapping[str, object], task_id: str, keyspace: Keyspace) -> dict[str, Any]:
    """Fingerprint each value of ``raw`` and sign the result for ``task_id``."""
    if raw.get(_SEALED):
        return dict(raw)  # already sealed (a re-published copy)
    fps = {
        str(dim): keyspace.fingerprint(str(dim), value)
        for dim, value in raw.items()
        if value is not None
    }
    return {_SEALED: 1, "fp": fps, "sig": _sign(fps, task_id, keyspace)}


def open_identity(
    header: object, task_id: str, keyspace: Keyspace
) -> tuple[dict[str, object] | None, str]:
    """The identity in a header, or None; and why (for the debug log).

    A sealed header must verify for this task id. A raw one (from a publisher that did not load
    ``throttle``) is accepted and fingerprinted here: it was as trustworthy as the task's own
    arguments, but its values crossed the broker in the clear.
    """
    if header is None:
        return None, "absent"
    if not isinstance(header, Mapping):
        return None, "malformed"
    if not header.get(_SEALED):
        return {str(k): v for k, v in header.items() if v is not None}, "raw"
    fps = header.get("fp")
    sig = header.get("sig")
    if not isinstance(fps, Mapping) or not isinstance(sig, str):
        return None, "malformed"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fps.items()):
        return None, "malformed"
    if not hmac.compare_digest(sig, _sign(fps, task_id, keyspace)):
        return None, "bad signature"
    try:
        return {k: Fingerprint(v) for k, v in fps.items()}, "sealed"
    except ValueError:
        return None, "malformed"


def _sign(fps: Mapping[str, str], task_id: str, keyspace: Keyspace) -> str:
    payload = json.dumps([task_id, sorted(fps.items())], separators=(",", ":")).encode()
    return hmac.new(keyspace.signing_key, payload, hashlib.sha256).hexdigest()[:32]
