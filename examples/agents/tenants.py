# SPDX-License-Identifier: MIT
"""The platform's customers: one API key each, in a tier.

The keys are SIMULATED secrets, made up for the demo. They stay inside the worker (to call the
provider) and the admission (which stores only their HMAC fingerprints): task messages carry
the tenant's label, because Celery's task events repeat a task's arguments, and what the demo
shows is the label (``acme (default)``), never a key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Tenant:
    label: str
    tier: str
    api_key: str = ""

    @property
    def title(self) -> str:
        return f"{self.label} ({self.tier})"


def _simulated_key(label: str) -> str:
    return "sk-sim-" + hashlib.sha256(f"demo key of {label}".encode()).hexdigest()[:32]


TENANTS: dict[str, Tenant] = {
    t.label: Tenant(t.label, t.tier, _simulated_key(t.label))
    for t in (Tenant("acme", "default"), Tenant("globex", "agent"), Tenant("initech", "admin"))
}
_BY_KEY = {t.api_key: t for t in TENANTS.values()}


def api_key(label: str) -> str:
    """The API key of the tenant labelled ``label`` (KeyError for an unknown one)."""
    return TENANTS[label].api_key


def tier_of_key(key: object) -> str | None:
    """The tier of an API key: what the platform's account database would answer."""
    tenant = _BY_KEY.get(key) if isinstance(key, str) else None
    return None if tenant is None else tenant.tier
