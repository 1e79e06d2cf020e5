# SPDX-License-Identifier: MIT
"""The demo's live view: what each API key's agents are doing, from Celery's task events.

:class:`Board` is fed by an event receiver thread (``task-received``, ``task-started``,
``task-succeeded``, ``task-failed`` and throttle's ``task-throttled``) and, once a second, by
reads of the store (the next free slot, the adaptive factors). A task is attributed to its
tenant and agent through the task id the producer recorded (``keys("tasks")``); events carry
no API key, and the board shows labels only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from examples.agents.tenants import TENANTS


@dataclass
class Tally:
    """One agent's (or, summed, one key's) counts."""

    enqueued: int = 0
    admitted: int = 0  # task-started: the gate let a copy through
    deferrals: int = 0  # task-throttled events
    upstream: int = 0  # of which for the provider's 429
    deferred: int = 0  # tasks whose latest event is a deferral
    running: int = 0
    done: int = 0
    failed: int = 0
    next_slot: float | None = None  # seconds until a new call would pass (None: unknown)
    bound_by: str | None = None

    def add(self, other: Tally) -> None:
        for name in ("enqueued", "admitted", "deferrals", "upstream", "deferred", "running"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.done += other.done
        self.failed += other.failed


@dataclass
class KeyView:
    """What the board shows of one tenant: its agents, and its key's own state."""

    label: str
    tier: str
    agents: dict[str, Tally] = field(default_factory=dict)
    key: Tally = field(default_factory=Tally)  # next slot and limit of the key's own limits
    upstream_factor: float = 1.0
    runaway: str | None = None

    def total(self) -> Tally:
        out = Tally(next_slot=self.key.next_slot, bound_by=self.key.bound_by)
        for tally in self.agents.values():
            out.add(tally)
        return out


@dataclass
class _Task:
    """One task's events so far (events of one task may arrive out of order: a deferral for
    a 429 is sent by the pool process, its start by the worker's main process)."""

    owner: tuple[str, str]
    starts: int = 0
    ends: int = 0  # completions, failures and deferrals after a start (429s)
    started_at: float = 0.0
    deferred_at: float = 0.0
    finished: bool = False


class Board:
    """Tallies per tenant and agent, updated from events (thread-safe)."""

    def __init__(self, whose: Callable[[str], tuple[str, str] | None], runaway: tuple[str, str]):
        self._whose = whose
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self.keys = {label: KeyView(label, t.tier) for label, t in TENANTS.items()}
        self.keys[runaway[0]].runaway = runaway[1]
        self.load_factor = 1.0
        self.events: dict[str, int] = {}
        self.workers: set[str] = set()
        self.provider: dict[str, int] = {"200": 0, "429": 0}

    # -- events --------------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", ""))
        with self._lock:
            self.events[kind] = self.events.get(kind, 0) + 1
            if kind.startswith("worker-"):
                self.workers.add(str(event.get("hostname")))
                return
            task_id = event.get("uuid")
            task = self._tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None and isinstance(task_id, str):
            owner = self._whose(task_id)  # a read of the producer's record, outside the lock
            if owner is None or owner[0] not in self.keys:
                return  # not work of this run
            with self._lock:
                task = self._tasks.setdefault(task_id, _Task(owner))
        if task is None:
            return
        with self._lock:
            _apply(task, self._tally(task.owner), kind, event)

    def _tally(self, owner: tuple[str, str]) -> Tally:
        view = self.keys[owner[0]]
        if owner[1] not in view.agents:
            view.agents[owner[1]] = Tally()
        return view.agents[owner[1]]

    # -- reads of the store and the producer's record ------------------------------------------

    def set_enqueued(self, counts: Iterable[tuple[str, str, int]]) -> None:
        with self._lock:
            for label, agent, n in counts:
                if label in self.keys:
                    self._tally((label, agent)).enqueued = n

    def agents(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(v.label, a) for v in self.keys.values() for a in v.agents]

    def set_slot(self, label: str, agent: str | None, wait: float, bound_by: str | None) -> None:
        with self._lock:
            view = self.keys[label]
            tally = view.key if agent is None else self._tally((label, agent))
            tally.next_slot, tally.bound_by = wait, bound_by

    def set_factors(self, load: float, upstream: dict[str, float]) -> None:
        with self._lock:
            self.load_factor = load
            for label, value in upstream.items():
                self.keys[label].upstream_factor = value

    def set_provider(self, answers: dict[str, int]) -> None:
        with self._lock:
            self.provider = dict(answers)

    # -- views ---------------------------------------------------------------------------------

    def snapshot(self) -> list[KeyView]:
        """A copy to render from, outside the lock; running and deferred counted from each
        task's events."""
        with self._lock:
            views = [
                KeyView(
                    v.label,
                    v.tier,
                    {a: replace(t, running=0, deferred=0) for a, t in sorted(v.agents.items())},
                    replace(v.key),
                    v.upstream_factor,
                    v.runaway,
                )
                for v in self.keys.values()
            ]
            tasks = list(self._tasks.values())
        by_label = {v.label: v for v in views}
        for task in tasks:
            tally = by_label[task.owner[0]].agents.get(task.owner[1])
            if tally is None or task.finished:
                continue
            if task.starts > task.ends:
                tally.running += 1
            elif task.deferred_at > task.started_at:
                tally.deferred += 1
        return views

    def render(self, elapsed: float, duration: float) -> RenderableType:
        """The rich view: one row per key, then its agents."""
        views = self.snapshot()
        table = Table(expand=False, header_style="bold", pad_edge=False, box=box.SIMPLE_HEAD)
        for name, justify in (
            ("key / agent", "left"),
            ("admitted", "right"),
            ("deferred", "right"),
            ("running", "right"),
            ("done", "right"),
            ("backlog done", "left"),
            ("next slot", "right"),
            ("factor", "right"),
        ):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for view in views:
            total = view.total()
            factor = self.load_factor * view.upstream_factor
            table.add_row(
                Text(TENANTS[view.label].title, style="bold cyan"),
                *_cells(total),
                _bar(total),
                _slot(total),
                Text(
                    f"{factor:.2f}" + (" 429s" if view.upstream_factor < 1 else ""),
                    style="yellow" if factor < 1 else "green",
                ),
            )
            for agent, tally in view.agents.items():
                runaway = agent == view.runaway
                table.add_row(
                    Text(
                        f"  {agent}" + (" (runaway)" if runaway else ""),
                        style="red" if runaway else "",
                    ),
                    *_cells(tally),
                    _bar(tally),
                    _slot(tally),
                    "",
                )
            table.add_section()
        head = Text.assemble(
            ("throttle demo: an agent platform on Celery, calling a ", ""),
            ("SIMULATED", "bold magenta"),
            (f" LLM provider      {elapsed:3.0f} s of {duration:g} s", ""),
        )
        p = self.provider
        foot = Text(
            f"provider answers: 200 x {p.get('200', 0):,}, 429 x {p.get('429', 0):,}   "
            f"load factor {self.load_factor:.2f}   workers {len(self.workers)}   "
            f"events {sum(self.events.values()):,}\n"
            "deferred: waiting now (deferrals so far)   next slot: how long a new call would "
            "wait, and the limit that says so   factor: load x the key's upstream factor",
            style="dim",
        )
        return Panel(Group(head, table, foot), border_style="blue", expand=False)

    def line(self, elapsed: float) -> str:
        """One plain line for logs (``--no-live``)."""
        parts = [f"t={elapsed:4.0f}s"]
        for view in self.snapshot():
            total = view.total()
            slot = "-" if total.next_slot is None else f"{total.next_slot:.1f}s"
            parts.append(
                f"{view.label}: adm {total.admitted} def {total.deferred}/{total.deferrals} "
                f"run {total.running} done {total.done}/{total.enqueued} next {slot} "
                f"f {self.load_factor * view.upstream_factor:.2f}"
            )
        parts.append(f"429s {self.provider.get('429', 0)}")
        return " | ".join(parts)


def _apply(task: _Task, tally: Tally, kind: str, event: dict[str, Any]) -> None:
    """Count one event of a task in its agent's tally."""
    at = float(event.get("timestamp") or 0.0)
    if kind == "task-throttled":
        tally.deferrals += 1
        task.deferred_at = max(task.deferred_at, at)
        if event.get("reason") == "upstream":
            tally.upstream += 1
            task.ends += 1
    elif kind == "task-started":
        tally.admitted += 1
        task.starts += 1
        task.started_at = max(task.started_at, at)
    elif kind == "task-succeeded":
        tally.done += 1
        task.ends += 1
        task.finished = True
    elif kind == "task-failed":
        tally.failed += 1
        task.ends += 1
        task.finished = True


def _cells(t: Tally) -> list[str]:
    return [f"{t.admitted:,}", f"{t.deferred:,} ({t.deferrals:,})", f"{t.running}", f"{t.done:,}"]


#: Short names of the limits, for the view.
SHORT = {"llm-requests": "requests", "llm-tokens": "tokens", "agent-share": "share"}


def _bar(t: Tally) -> RenderableType:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(
        ProgressBar(total=max(t.enqueued, 1), completed=t.done, width=12),
        Text(f"{t.done:,}/{t.enqueued:,}", style="dim"),
    )
    return grid


def _slot(t: Tally) -> Text:
    if t.next_slot is None:
        return Text("-", style="dim")
    if t.next_slot <= 0:
        return Text("now", style="green")
    return Text(
        f"{_duration(t.next_slot)} {SHORT.get(t.bound_by or '', t.bound_by)}", style="yellow"
    )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
