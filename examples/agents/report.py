# SPDX-License-Identifier: MIT
"""The demo's summary: what was enqueued, what ran (and how often), what is still waiting,
each key's achieved rate against its configured one, and a chart.

Everything is read after the workers have stopped: from the platform's records (each task
body start and completion, each deferral: ``examples.agents.app.keys``), from the broker
(the work still waiting is back in the queue once the workers are gone) and from the simulated
provider's count of its answers.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from examples.agents.app import PREFIX, QUEUE, app, keys
from examples.agents.tenants import TENANTS
from throttle.celeryext.worker import extension

#: A key's admissions over the whole run may not exceed ``burst + rate x span`` (plus one for
#: the edges): every admission is charged at or before its task starts. Over shorter windows
#: the starts may bunch above that: a worker busy with the runaway's thousand deferrals starts
#: the countdowns that fell due meanwhile together, and a task denied again at its booked
#: slot by another limit keeps the slot it paid for and redeems it when it finally runs. The
#: summary shows the largest such excess (``peak_excess``) for what it is, a measurement.
SLACK = 1.0
#: Averaging windows of the chart's rates, seconds (an agent's calls are seconds apart).
SMOOTH = 5
AGENT_SMOOTH = 11


Style = dict[str, Any]
SIBLINGS = ("tab:purple", "tab:brown", "tab:olive", "tab:cyan")


@dataclass(frozen=True)
class Limits:
    """A tenant's configured limits, per second."""

    requests: float
    burst: float
    share: float
    share_burst: float


def limits_of(label: str) -> Limits:
    """The limits the app's settings give a tenant's tier."""
    settings = extension(app).settings
    tier = TENANTS[label].tier
    requests = settings.policy("llm-requests", tier).limit
    share = settings.policy("agent-share", tier).limit
    return Limits(requests.rate.per_second, requests.burst, share.rate.per_second, share.burst)


@dataclass
class Run:
    """What the records, the broker and the provider say about one run."""

    start: float  # wall time the traffic started
    end: float  # wall time it stopped
    tasks: dict[str, tuple[str, str]]  # task id -> (tenant, agent), as the producer recorded
    sent: dict[str, float]  # task id -> when the producer sent it
    done: dict[str, int]  # task id -> completions
    runs: list[tuple[float, str, str, str]]  # (time, tenant, agent, task id) per body start
    finished: list[dict[str, Any]]
    deferrals: dict[str, int]
    reasons: dict[str, int]
    pending: set[str]  # task ids of messages still in the broker
    copies: int  # messages still in the broker (a stale twin counts twice)
    provider: list[tuple[float, str, int]] = field(default_factory=list)  # (time, tenant, st.)
    factors: list[tuple[float, float, dict[str, float]]] = field(default_factory=list)


def collect(
    records: redis.Redis,
    start: float,
    end: float,
    provider: list[tuple[float, str, int]],
    factors: list[tuple[float, float, dict[str, float]]],
) -> Run:
    """Read the run back (call it once the workers have stopped)."""
    tasks = {k.decode(): v.decode().split(" ", 2) for k, v in _hash(records, "tasks").items()}
    runs = []
    for raw in records.lrange(keys("runs"), 0, -1):
        entry = json.loads(raw)
        runs.append((float(entry["t"]), entry["tenant"], entry["agent"], entry["id"]))
    pending, copies = _waiting(records)
    return Run(
        start=start,
        end=end,
        tasks={k: (v[0], v[1]) for k, v in tasks.items()},
        sent={k: float(v[2]) for k, v in tasks.items()},
        done={k.decode(): int(v) for k, v in _hash(records, "done").items()},
        runs=sorted(runs),
        finished=[json.loads(raw) for raw in records.lrange(keys("finished"), 0, -1)],
        deferrals={k.decode(): int(v) for k, v in _hash(records, "deferrals").items()},
        reasons={k.decode(): int(v) for k, v in _hash(records, "reasons").items()},
        pending=pending,
        copies=copies,
        provider=provider,
        factors=factors,
    )


def _hash(records: redis.Redis, name: str) -> dict[bytes, bytes]:
    return records.hgetall(keys(name))  # type: ignore[return-value]


def _waiting(records: redis.Redis) -> tuple[set[str], int]:
    """Task ids of the messages in the queue and of those a worker still held unacknowledged
    (a warm shutdown gives those back to the queue; a killed worker leaves them here)."""
    messages = [json.loads(raw) for raw in records.lrange(f"{PREFIX}:{QUEUE}", 0, -1)]
    messages += [json.loads(raw)[0] for raw in records.hvals(f"{PREFIX}:unacked")]
    ids = []
    for message in messages:
        task_id = (message.get("headers") or {}).get("id")
        if task_id is None:  # protocol 1: the id is in the body
            task_id = json.loads(base64.b64decode(message["body"])).get("id")
        ids.append(str(task_id))
    return set(ids), len(ids)


def summarise(run: Run, *, duration: float, interrupted: bool, chart: str) -> dict[str, Any]:
    """The summary as plain data (``--json-summary``)."""
    span = max(run.end - run.start, 1e-9)
    enqueued = set(run.tasks)
    completed = {t for t, n in run.done.items() if n >= 1}
    twice = sorted(t for t, n in run.done.items() if n > 1)
    pending = run.pending - completed
    summary: dict[str, Any] = {
        "duration": duration,
        "traffic_seconds": round(span, 3),
        "interrupted": interrupted,
        "tasks": {
            "enqueued": len(enqueued),
            "completed": len(completed & enqueued),
            "completed_twice": len(twice),
            "pending": len(pending & enqueued),
            "stale_copies": run.copies - len(run.pending) + len(run.pending & completed),
            "lost": len(enqueued - completed - pending),
            "unknown": len((completed | pending) - enqueued),
        },
        "deferrals": _deferrals(run.deferrals, enqueued) | {"by_reason": dict(run.reasons)},
        "provider": dict(Counter(str(status) for _, _, status in run.provider)),
        "keys": {},
        "agents": {},
        "chart": chart,
    }
    runaway = _runaway()
    for label, tenant in TENANTS.items():
        limits = limits_of(label)
        mine = {t for t, owner in run.tasks.items() if owner[0] == label}
        times = [t for t, tenant_, _, _ in run.runs if tenant_ == label and t <= run.end]
        allowed = limits.burst + limits.requests * span + SLACK
        used = [f for f in run.finished if f["tenant"] == label]
        answers = Counter(status for _, who, status in run.provider if who == label)
        summary["keys"][label] = {
            "tier": tenant.tier,
            "configured_per_s": limits.requests,
            "burst": limits.burst,
            "admissions": len(times),
            "achieved_per_s": round(len(times) / span, 3),
            "allowed": round(allowed, 3),
            "within_limit": len(times) <= allowed,
            "peak_excess": round(max_excess(times, limits.requests), 3),
            "enqueued": len(mine),
            "completed": len(mine & completed),
            "pending": len(mine & pending),
            "deferrals": _deferrals(run.deferrals, mine),
            "provider_200": answers.get(200, 0),
            "provider_429": answers.get(429, 0),
            "tokens_estimated": round(sum(f["estimate"] for f in used)),
            "tokens_used": sum(int(f["tokens"]) for f in used),
        }
    runaway_start = min((t for t, a, b, _ in run.runs if (a, b) == runaway), default=run.end)
    summary["runaway"] = {
        "agent": "/".join(runaway),
        "first_call_s": round(runaway_start - run.start, 3),
    }
    agents = sorted(set(run.tasks.values()))
    for label, agent in agents:
        mine = {t for t, owner in run.tasks.items() if owner == (label, agent)}
        times = [t for t, a, b, _ in run.runs if (a, b) == (label, agent) and t <= run.end]
        later = {t for t in mine if run.sent[t] > runaway_start}
        summary["agents"][f"{label}/{agent}"] = {
            "tenant": label,
            "agent": agent,
            "runaway": (label, agent) == runaway,
            "share_per_s": limits_of(label).share,
            "enqueued": len(mine),
            "completed": len(mine & completed),
            "pending": len(mine & pending),
            "admissions": len(times),
            "admissions_after_runaway": sum(1 for t in times if t > runaway_start),
            "enqueued_after_runaway": len(later),
            "completed_after_runaway": len(later & completed),
            "achieved_per_s": round(len(times) / span, 3),
            "deferred_tasks": sum(1 for t in mine if run.deferrals.get(t, 0) > 0),
            "deferrals": _deferrals(run.deferrals, mine),
        }
    return summary


def _runaway() -> tuple[str, str]:
    from examples.agents.producer import RUNAWAY

    return RUNAWAY


def _deferrals(deferrals: Mapping[str, int], tasks: Iterable[str]) -> dict[str, float]:
    counts = [deferrals.get(t, 0) for t in tasks]
    if not counts:
        return {"total": 0, "mean": 0.0, "max": 0}
    return {"total": sum(counts), "mean": round(sum(counts) / len(counts), 3), "max": max(counts)}


def max_excess(times: list[float], rate: float) -> float:
    """The most any window of admissions exceeds ``rate x its span``: at most the burst for
    work admitted by a token bucket of that rate."""
    best, lowest = 0.0, math.inf
    for i, t in enumerate(sorted(times)):
        lowest = min(lowest, i - rate * t)
        best = max(best, i - rate * t - lowest + 1)
    return best


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """The summary as tables."""
    keys_table = Table(
        title=(
            "Per API key (within: admissions <= burst + limit x run; peak: most starts above "
            "limit x span in any window)"
        ),
        header_style="bold",
    )
    for name in (
        "key",
        "limit",
        "achieved",
        "within",
        "peak",
        "done/enqueued",
        "waiting",
        "deferrals mean/max",
        "429s",
        "tokens used/est.",
    ):
        keys_table.add_column(name, justify="left" if name == "key" else "right")
    for label, k in summary["keys"].items():
        keys_table.add_row(
            TENANTS[label].title,
            f"{k['configured_per_s']:.2f}/s",
            f"{k['achieved_per_s']:.2f}/s",
            "yes" if k["within_limit"] else f"NO ({k['admissions']} > {k['allowed']:.0f})",
            f"{k['peak_excess']:.1f}",
            f"{k['completed']:,}/{k['enqueued']:,}",
            f"{k['pending']:,}",
            f"{k['deferrals']['mean']:.2f}/{k['deferrals']['max']}",
            f"{k['provider_429']:,}",
            f"{k['tokens_used'] / 1000:,.0f}k/{k['tokens_estimated'] / 1000:,.0f}k",
        )
    console.print(keys_table)
    agents_table = Table(title="Per agent", header_style="bold")
    for name in ("agent", "share", "achieved", "done/enqueued", "deferred tasks"):
        agents_table.add_column(name, justify="left" if name == "agent" else "right")
    for name, a in summary["agents"].items():
        agents_table.add_row(
            name + ("  RUNAWAY" if a["runaway"] else ""),
            f"{a['share_per_s']:.2f}/s",
            f"{a['achieved_per_s']:.2f}/s",
            f"{a['completed']:,}/{a['enqueued']:,}",
            f"{a['deferred_tasks']:,}",
        )
    console.print(agents_table)
    t = summary["tasks"]
    d = summary["deferrals"]
    p = summary["provider"]
    verdict = (
        "nothing lost, nothing run twice"
        if not (t["lost"] or t["completed_twice"])
        else (f"LOST {t['lost']}, RUN TWICE {t['completed_twice']}")
    )
    console.print(
        f"Tasks: {t['enqueued']:,} enqueued, {t['completed']:,} completed exactly once, "
        f"{t['pending']:,} still deferred or queued (back in the broker), {t['lost']} lost, "
        f"{t['completed_twice']} run twice: [bold]{verdict}[/bold].\n"
        f"Deferrals: {d['total']:,} ({d['mean']:.2f} per task on average, at most {d['max']}); "
        f"by reason {d['by_reason']}.\n"
        f"Simulated provider: {p.get('200', 0):,} answered 200, {p.get('429', 0):,} answered 429."
    )


def chart(run: Run, summary: dict[str, Any], path: Path) -> None:
    """Admissions per second per key against each key's limit; the runaway agent against its
    siblings; the provider's 429s and the adaptive factor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = max(1, math.ceil(run.end - run.start))
    colours = dict(zip(TENANTS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    for label in TENANTS:
        k = summary["keys"][label]
        times = [t for t, tenant, _, _ in run.runs if tenant == label]
        top.plot(*_rate(times, run.start, seconds), color=colours[label], label=f"{label}")
        top.axhline(
            k["configured_per_s"],
            color=colours[label],
            linestyle="--",
            linewidth=1,
            label=f"{TENANTS[label].title} limit {k['configured_per_s']:g}/s",
        )
        factors = [(t - run.start, load * up.get(label, 1.0)) for t, load, up in run.factors]
        if any(f < 1 for _, f in factors):
            top.step(
                [t for t, _ in factors],
                [k["configured_per_s"] * f for _, f in factors],
                where="post",
                color=colours[label],
                linestyle=":",
                linewidth=1,
                label=f"{label} limit x adaptive factor",
            )
    top.set_title("Admissions per second per API key (tasks started), against each key's limit")
    top.set_ylabel(f"admissions/s ({SMOOTH} s mean)")
    top.legend(fontsize=8, ncol=2, loc="upper right")
    runaway = _runaway()
    label = runaway[0]
    for (tenant, agent), style in _agent_styles(run, label, runaway[1]):
        times = [t for t, a, b, _ in run.runs if (a, b) == (tenant, agent)]
        middle.plot(*_rate(times, run.start, seconds, smooth=AGENT_SMOOTH), label=agent, **style)
    middle.axhline(
        limits_of(label).share, color="black", linestyle="--", linewidth=1, label="agent share"
    )
    middle.axhline(
        limits_of(label).requests,
        color=colours[label],
        linestyle="--",
        linewidth=1,
        label="key limit",
    )
    middle.set_title(f"Inside {TENANTS[label].title}: the runaway agent against its siblings")
    middle.set_ylabel(f"admissions/s ({AGENT_SMOOTH} s mean)")
    middle.legend(fontsize=8, ncol=3, loc="upper right")
    for label in TENANTS:
        refused = [t for t, who, status in run.provider if who == label and status == 429]
        xs, ys = _rate(refused, run.start, seconds, smooth=1)
        bottom.plot(xs, ys, color=colours[label], linewidth=1, label=f"{label}: 429/s")
    bottom.set_ylabel("provider 429s per second")
    bottom.set_xlabel("seconds since the first task was sent")
    factor_axis = bottom.twinx()
    for label in TENANTS:
        times = [t - run.start for t, _, _ in run.factors]
        ys = [load * up.get(label, 1.0) for _, load, up in run.factors]
        factor_axis.plot(
            times, ys, color=colours[label], linestyle=":", linewidth=2, label=f"{label}: factor"
        )
    factor_axis.set_ylim(0, 1.05)
    factor_axis.set_ylabel("adaptive factor (load x upstream)")
    bottom.set_title("The simulated provider's 429s, and the adaptive factor of each key")
    lines = bottom.get_legend_handles_labels()
    more = factor_axis.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _agent_styles(run: Run, label: str, runaway: str) -> list[tuple[tuple[str, str], Style]]:
    agents = sorted({owner for owner in run.tasks.values() if owner[0] == label})
    return [
        (
            owner,
            {"color": "red", "linewidth": 2}
            if owner[1] == runaway
            else {"color": SIBLINGS[i % len(SIBLINGS)], "linewidth": 1},
        )
        for i, owner in enumerate(agents)
    ]


def _rate(
    times: Iterable[float], start: float, seconds: int, smooth: int = SMOOTH
) -> tuple[list[int], list[float]]:
    """Events per second, each second averaged over ``smooth`` seconds around it."""
    counts = [0] * (seconds + 1)
    for t in times:
        i = int(t - start)
        if 0 <= i <= seconds:
            counts[i] += 1
    half = smooth // 2
    ys = []
    for i in range(seconds + 1):
        window = counts[max(0, i - half) : i + half + 1]
        ys.append(sum(window) / len(window))
    return list(range(seconds + 1)), ys
