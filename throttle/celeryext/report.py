# SPDX-License-Identifier: MIT
"""What ``celery throttle`` shows, as plain data (dicts of numbers and strings, ready for JSON).

Keys appear by fingerprint only. An API key an operator types is fingerprinted here, in the
process, with the app's secret: it is never sent anywhere. Every read goes through the store;
nothing here charges a bucket (states are read by peeking, see :meth:`BaseStore.peek`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from throttle.adaptive.policy import Sample
from throttle.adaptive.sampler import SAMPLE_LIFE
from throttle.celeryext.counts import ANONYMOUS, OTHER, KeyTraffic, suggest, traffic
from throttle.celeryext.settings import DEFAULT_TIER, LimitPolicy, redact_url
from throttle.errors import ConfigurationError
from throttle.identity import Fingerprint
from throttle.limits import Limit
from throttle.store.base import LoadFactor

if TYPE_CHECKING:
    from throttle.celeryext.app import Throttle

__all__ = [
    "factor_fields",
    "identity_report",
    "parse_override",
    "reset_limits",
    "sample_fields",
    "status_report",
    "suggest_report",
]

#: The reader's name in the load samples hash (it reads; it records nothing).
_READER = "celery-throttle-cli"


def status_report(ext: Throttle, *, top: int = 5, minutes: int | None = None) -> dict[str, Any]:
    """Every limit of every tier, the factor in force, the ``top`` busiest keys of the last
    ``minutes`` minutes (default: five, or all the counts kept when that is less) with their
    buckets, bookings and next free slot, and the live workers with their load samples."""
    kept = max(1, math.floor(ext.settings.counts_retention / 60))
    if minutes is None:
        minutes = min(5, kept)
    store = ext.store()
    settings = ext.settings
    factor = store.load_factor()
    report: dict[str, Any] = {
        "store": {"url": redact_url(settings.redis_url), "prefix": settings.key_prefix},
        "factor": factor_fields(factor),
        "limits": [
            _limit_row(tier, policy)
            for tier in _tiers(settings.tiers)
            for policy in settings.tiers[tier].values()
        ],
        "workers": _workers(ext),
        "minutes": minutes,
        "keys": [],
    }
    if ext.gate.tally is None:
        report["counts"] = "off (throttle_counts_retention is 0)"
        return report
    if minutes > kept:
        raise ConfigurationError("--minutes", f"got {minutes}", f"1 to {kept} (the counts kept)")
    found = traffic(store.counts(minutes))
    busiest = sorted(
        (t for t in found.values() if t.key != OTHER),
        key=lambda t: (-(sum(t.admitted) + sum(t.deferred)), t.key),
    )[:top]
    bookings, complete = _bookings(ext)
    report["bookings_complete"] = complete
    for t in busiest:
        report["keys"].append(_key_row(ext, t, minutes, bookings))
    return report


def _key_row(
    ext: Throttle, t: KeyTraffic, minutes: int, bookings: Mapping[str, int]
) -> dict[str, Any]:
    identity = _fingerprint_identity(t.key)
    tier = t.tier or DEFAULT_TIER
    policies = ext.settings.tiers.get(tier, ext.settings.tiers[DEFAULT_TIER])
    keyed = [p for p in policies.values() if p.limit.per == ("api_key",)]
    states = [{**_peek(ext, p.limit, identity), "mode": p.mode} for p in keyed]
    enforced = [s["next_free_s"] for s in states if s["mode"] == "enforce"]
    tag = ext.keyspace.tenant_tag(identity)
    return {
        "key": t.key,
        "tier": tier,
        "admitted_per_minute": sum(t.admitted) / minutes,
        "deferred_per_minute": sum(t.deferred) / minutes,
        "deferred_share": t.deferred_share,
        "upstream_factor": ext.store().upstream_factor(identity),
        "bookings": bookings.get(tag, 0),
        "next_free_s": max(enforced, default=0.0),
        "limits": states,
    }


def identity_report(
    ext: Throttle,
    api_key: str,
    agent_id: str | None = None,
    dims: Mapping[str, str] | None = None,
    tier: str | None = None,
) -> dict[str, Any]:
    """The buckets of one identity in its tier (or ``tier``): every limit's tokens left,
    time until full and next free slot, the factors in force and the key's bookings. A limit
    keyed by a dimension the identity leaves out (an agent limit without ``agent_id``) is
    listed with the number of its buckets under this key instead."""
    settings = ext.settings
    identity: dict[str, object] = {"api_key": api_key, **(dims or {})}
    if agent_id is not None:
        identity["agent_id"] = agent_id
    if tier is None:
        tier = ext.gate.tier_of(identity)
    elif tier not in settings.tiers:
        raise ConfigurationError(
            "--tier", f"unknown tier {tier!r}", ", ".join(_tiers(settings.tiers))
        )
    identity["tier"] = tier
    fingerprint = ext.keyspace.fingerprint("api_key", api_key)
    sealed: dict[str, object] = {"api_key": Fingerprint(fingerprint), "tier": tier}
    for dim, value in identity.items():
        if dim not in sealed:
            sealed[dim] = Fingerprint(ext.keyspace.fingerprint(dim, value))
    store = ext.store()
    tag = ext.keyspace.tenant_tag(sealed)
    rows = []
    for policy in settings.tiers[tier].values():
        limit = policy.limit
        missing = [d for d in limit.per if d not in sealed]
        if missing:
            if limit.is_global:
                pattern = f"{settings.key_prefix}:{{{limit.name}:*"
            else:
                pattern = f"{settings.key_prefix}:{tag}:{limit.name}:*"
            keys, complete = store.scan_keys(pattern)
            buckets = len([k for k in keys if not k.endswith(":~n")])
            rows.append(
                {
                    **_limit_row(tier, policy),
                    "missing": missing,
                    "buckets": buckets,
                    "buckets_complete": complete,
                }
            )
            continue
        rows.append({**_limit_row(tier, policy), **_peek(ext, limit, sealed)})
    booked, complete = store.scan_keys(f"{settings.key_prefix}:{tag}:~b:*")
    return {
        "key": fingerprint,
        "agent": None if agent_id is None else ext.keyspace.fingerprint("agent_id", agent_id),
        "tier": tier,
        "load_factor": store.load_factor().in_force,
        "upstream_factor": store.upstream_factor(sealed),
        "bookings": len(booked),
        "bookings_complete": complete,
        "limits": rows,
    }


def reset_limits(
    ext: Throttle,
    api_key: str,
    names: Sequence[str] = (),
    agent_id: str | None = None,
) -> dict[str, Any]:
    """Forget the buckets of one key for the limits ``names`` (default: every limit keyed by
    the API key), as every tier defines them: for every agent, or with ``agent_id`` only the
    limits keyed by agent, for that agent. Global limits are never touched."""
    settings = ext.settings
    known = settings.tiers[DEFAULT_TIER]
    for name in names:
        if name not in known:
            raise ConfigurationError("--limit", f"unknown limit {name!r}", ", ".join(known))
    wanted = set(names or known)
    chosen: dict[tuple[str, tuple[str, ...], str], Limit] = {}
    for tier in _tiers(settings.tiers):  # a tier may key a limit or count it otherwise
        for policy in settings.tiers[tier].values():
            if policy.name in wanted:
                limit = policy.limit
                chosen.setdefault((limit.name, limit.per, limit.algorithm), limit)
    global_ = sorted({lim.name for lim in chosen.values() if lim.is_global})
    if names and global_:
        raise ConfigurationError(
            "--limit", f"{', '.join(global_)} is not keyed by API key", "a keyed limit"
        )
    keyed = [lim for lim in chosen.values() if not lim.is_global]
    fingerprint = ext.keyspace.fingerprint("api_key", api_key)
    identity: dict[str, object] = {"api_key": Fingerprint(fingerprint)}
    if agent_id is not None:
        identity["agent_id"] = Fingerprint(ext.keyspace.fingerprint("agent_id", agent_id))
        unkeyed = sorted({lim.name for lim in keyed if "agent_id" not in lim.per})
        if names and unkeyed:
            raise ConfigurationError(
                "--agent-id",
                f"{', '.join(unkeyed)} is not keyed by agent",
                "a limit keyed by agent_id",
            )
        keyed = [lim for lim in keyed if "agent_id" in lim.per]
    deleted = ext.store().reset(keyed, identity)
    shown = sorted({lim.name for lim in keyed}, key=list(known).index)
    return {"key": fingerprint, "limits": shown, "deleted": deleted}


def suggest_report(
    ext: Throttle, *, minutes: int | None = None, headroom: float = 2.5, top: int = 20
) -> dict[str, Any]:
    """From the per-key counts of the last ``minutes`` minutes (default: all that are kept):
    each key's busiest minute under each of its limits keyed by API key, a limit with
    ``headroom`` times that peak, the keys deferred most of the time, and what the shadow
    limits would have denied."""
    settings = ext.settings
    if ext.gate.tally is None:
        raise ConfigurationError(
            "throttle_counts_retention", "is 0: no traffic counts are kept", "seconds >= 60"
        )
    kept = max(1, math.floor(settings.counts_retention / 60))
    if minutes is None:
        minutes = kept
    if not 1 <= minutes <= kept:
        raise ConfigurationError("--minutes", f"got {minutes}", f"1 to {kept} (the counts kept)")
    if not (math.isfinite(headroom) and headroom >= 1):
        raise ConfigurationError("--headroom", f"got {headroom}", "a number >= 1")
    found = traffic(ext.store().counts(minutes))
    rows: list[dict[str, Any]] = []
    for t in found.values():
        if t.key == OTHER:
            continue
        tier = t.tier or DEFAULT_TIER
        policies = settings.tiers.get(tier, settings.tiers[DEFAULT_TIER]).values()
        keyed = [p for p in policies if p.limit.per == ("api_key",)]
        rates = {p.name: p.limit.rate.per_second * 60 for p in keyed}
        shadow = [p.name for p in keyed if p.mode == "shadow"]
        for s in suggest({t.key: t}, rates, shadow, headroom=headroom):
            rows.append(
                {
                    "key": s.key,
                    "tier": tier,
                    "limit": s.limit,
                    "unit": settings.policy(s.limit, tier).limit.unit,
                    "mode": settings.policy(s.limit, tier).mode,
                    "configured_per_minute": s.configured,
                    "peak_per_minute": s.peak,
                    "proposed_per_minute": s.proposed,
                    "deferred_share": s.deferred_share,
                    "too_tight": s.too_tight,
                    "would_deny": s.would_deny,
                }
            )
    rows.sort(key=lambda r: (-r["peak_per_minute"], r["key"], r["limit"]))
    busiest: list[str] = []
    for row in rows:
        if row["key"] not in busiest:
            busiest.append(row["key"])
    shown = set(busiest[:top])
    return {
        "minutes": minutes,
        "headroom": headroom,
        "other_keys": OTHER in found,
        "rows": [r for r in rows if r["key"] in shown],
    }


# -- pieces --------------------------------------------------------------------------------------


def _tiers(tiers: Mapping[str, object]) -> list[str]:
    return [DEFAULT_TIER, *sorted(t for t in tiers if t != DEFAULT_TIER)]


def _limit_row(tier: str, policy: LimitPolicy) -> dict[str, Any]:
    limit = policy.limit
    return {
        "tier": tier,
        "limit": limit.name,
        "rate": str(limit.rate),
        "burst": limit.burst,
        "unit": limit.unit,
        "per": list(limit.per),
        "algorithm": limit.algorithm,
        "mode": policy.mode,
        "adaptive": limit.adaptive,
        "upstream": policy.upstream,
    }


def _fingerprint_identity(key: str) -> dict[str, object]:
    """The identity of a key known by its fingerprint (``-``: work without an API key)."""
    return {} if key == ANONYMOUS else {"api_key": Fingerprint(key)}


def _peek(ext: Throttle, limit: Limit, identity: Mapping[str, object]) -> dict[str, Any]:
    unit = min(1.0, limit.max_cost)
    decision = ext.store().peek(
        [limit], identity, cost=unit, adaptive=ext.settings.adaptive.enabled
    )
    state = decision.limits[0]
    return {
        "limit": limit.name,
        "remaining": state.remaining,
        "burst": limit.burst,
        "full_in_s": state.reset_after,
        "next_free_s": decision.retry_after,
    }


def _bookings(ext: Throttle) -> tuple[dict[str, int], bool]:
    """Bookings waiting, per tenant hash tag (one scan of the keyspace)."""
    keys, complete = ext.store().scan_keys(f"{ext.settings.key_prefix}:*:~b:*")
    counts: dict[str, int] = {}
    start = len(ext.settings.key_prefix) + 1
    for key in keys:
        tag = key[start:].split(":~b:", 1)[0]
        counts[tag] = counts.get(tag, 0) + 1
    return counts, complete


def _workers(ext: Throttle) -> list[dict[str, Any]]:
    """The live workers' latest load samples (workers report them while adaptive is on)."""
    interval = ext.settings.adaptive.interval
    texts = ext.store().record_sample(_READER, None, max_age=SAMPLE_LIFE * interval)
    live = sorted(filter(None, map(Sample.from_json, texts)), key=lambda s: s.worker)
    return [sample_fields(sample) for sample in live]


def parse_override(value: object) -> float | None:
    """An operator's load factor override as typed: a number in (0, 1], or ``clear`` (None)."""
    text = str(value).strip().lower()
    if text == "clear":
        return None
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not 0 < factor <= 1:
        raise ConfigurationError("factor", f"got {value!r}", "a number in (0, 1] or 'clear'")
    return factor


def factor_fields(factor: LoadFactor) -> dict[str, Any]:
    return {"in_force": factor.in_force, "computed": factor.computed, "override": factor.override}


def sample_fields(sample: Sample) -> dict[str, Any]:
    return {
        "worker": sample.worker,
        "cpu": sample.cpu,
        "memory": sample.memory,
        "busy": sample.busy,
        "signals": dict(sample.signals),
    }
