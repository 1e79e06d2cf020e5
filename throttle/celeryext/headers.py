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

from throttle.errors import IdentityError
from throttle.identity import Fingerprint, Keyspace

__all__ = [
    "ADMITTED",
    "BOOKING",
    "DEFERRALS",
    "ETA",
    "IDENTITY",
    "INTERNAL",
    "TOKEN",
    "USAGE",
    "open_admitted",
    "open_identity",
    "seal_admitted",
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
#: Set by the gate on work it let through, for the pool side: the receipt to settle. Signed
#: (see :func:`seal_admitted`): a message that arrives carrying one proves nothing.
ADMITTED: Final = "throttle_admitted"
#: The request attribute where ``report_usage()`` adds up a task's usage (never a header: a
#: message that carries one is not believed).
USAGE: Final = "throttle_usage"
#: When a deferred copy is due, ``[seconds since the epoch on the store's clock, retries]``
#: (the worker that receives it converts it to its own clock: see worker.EtaStep).
ETA: Final = "throttle_eta"
#: Headers a re-published copy must not inherit from the copy it replaces.
INTERNAL: Final = (ADMITTED, ETA, "redelivered")

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
        raw = {str(k): v for k, v in header.items() if v is not None}
        try:  # a value no fingerprint takes (a float, a list): the header is not an identity
            for dim, value in raw.items():
                keyspace.fingerprint(dim, value)
        except IdentityError:
            return None, "malformed"
        return raw, "raw"
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


def seal_admitted(
    admitted: Mapping[str, Any], task_id: str, retries: object, keyspace: Keyspace
) -> dict[str, Any]:
    """The gate's admission header for one delivery of a task, signed for its id and retry
    count, so the pool side can tell it from one a message brought (forged, or copied by
    Celery into a retry of the same task)."""
    fields = {k: v for k, v in admitted.items() if k != "sig"}
    return {**fields, "sig": _sign_admitted(fields, task_id, retries, keyspace)}


def open_admitted(
    admitted: object, task_id: str, retries: object, keyspace: Keyspace
) -> dict[str, Any] | None:
    """The admission header if the gate signed it for this task and retry count, else None."""
    if not isinstance(admitted, Mapping) or not isinstance(admitted.get("sig"), str):
        return None
    fields = {str(k): v for k, v in admitted.items() if k != "sig"}
    try:
        expected = _sign_admitted(fields, task_id, retries, keyspace)
    except (TypeError, ValueError):  # not JSON: not ours
        return None
    return fields if hmac.compare_digest(admitted["sig"], expected) else None


def _sign_admitted(
    fields: Mapping[str, Any], task_id: str, retries: object, keyspace: Keyspace
) -> str:
    count = retries if isinstance(retries, int) and not isinstance(retries, bool) else 0
    payload = json.dumps(
        ["admitted", task_id, count, fields], sort_keys=True, separators=(",", ":")
    ).encode()
    return hmac.new(keyspace.signing_key, payload, hashlib.sha256).hexdigest()[:32]


def _sign(fps: Mapping[str, str], task_id: str, keyspace: Keyspace) -> str:
    payload = json.dumps([task_id, sorted(fps.items())], separators=(",", ":")).encode()
    return hmac.new(keyspace.signing_key, payload, hashlib.sha256).hexdigest()[:32]
