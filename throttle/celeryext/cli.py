# SPDX-License-Identifier: MIT
"""``celery -A app throttle ...``: see and steer the limits from a shell.

Registered under Celery's ``celery.commands`` entry point::

    celery -A app throttle status [--top N] [--minutes M]
    celery -A app throttle inspect --api-key K [--agent-id A] [--dim NAME=VALUE] [--tier T]
    celery -A app throttle reset --api-key K [--agent-id A] [--limit NAME] [--yes]
    celery -A app throttle factor [0.5 | clear]
    celery -A app throttle suggest [--minutes M] [--headroom 2.5] [--top N]

Each takes ``--json`` for scripts. An error (Redis down, an unknown limit, a bad value) is one
line on stderr and exit code 1. Keys are shown by fingerprint; an API key given on the command
line is fingerprinted in this process and never sent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from throttle.celeryext import report
from throttle.celeryext.settings import redact_url
from throttle.errors import ConfigurationError, StoreUnavailable, ThrottleError

__all__ = ["throttle"]

F = TypeVar("F", bound=Callable[..., Any])

_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


def _ext(ctx: click.Context) -> Any:
    from throttle.celeryext.worker import extension

    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.ClickException("no Celery app: run it as `celery -A yourapp throttle ...`")
    try:
        return extension(app)
    except ThrottleError as exc:
        raise click.ClickException(f"{exc} (app {app.main!r})") from exc


def _one_line_errors(fn: F) -> F:
    """Turn our errors into one line and exit code 1 (click's own errors exit 2)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StoreUnavailable as exc:
            ctx = click.get_current_context()
            url = redact_url(_ext(ctx).settings.redis_url)
            raise click.ClickException(
                f"the throttle store at {url} did not answer: {exc}"
            ) from exc
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
        except ThrottleError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text(data))


@click.group(name="throttle")
def throttle() -> None:
    """Inspect and steer throttle's limits."""


@throttle.command()
@click.option("--top", default=5, show_default=True, type=click.IntRange(1), help="Keys shown.")
@click.option("--minutes", default=None, type=click.IntRange(1), help="Busy over (default 5).")
@_JSON
@click.pass_context
@_one_line_errors
def status(ctx: click.Context, top: int, minutes: int | None, as_json: bool) -> None:
    """Limits and tiers, the factor in force, the busiest keys and the live workers."""
    _emit(report.status_report(_ext(ctx), top=top, minutes=minutes), as_json, _status_text)


@throttle.command()
@click.option("--api-key", required=True, help="The API key (fingerprinted here, never sent).")
@click.option("--agent-id", default=None, help="An agent of that key.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE", help="A custom dimension.")
@click.option("--tier", default=None, help="The tier (default: as the tier resolver says).")
@_JSON
@click.pass_context
@_one_line_errors
def inspect(
    ctx: click.Context,
    api_key: str,
    agent_id: str | None,
    dims: Sequence[str],
    tier: str | None,
    as_json: bool,
) -> None:
    """The buckets of one API key (and agent)."""
    found = report.identity_report(_ext(ctx), api_key, agent_id, _dims(dims), tier)
    _emit(found, as_json, _identity_text)


@throttle.command()
@click.option("--api-key", required=True, help="The API key (fingerprinted here, never sent).")
@click.option("--agent-id", default=None, help="Only this agent's buckets.")
@click.option("--limit", "limits", multiple=True, help="Only this limit (repeatable).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_JSON
@click.pass_context
@_one_line_errors
def reset(
    ctx: click.Context,
    api_key: str,
    agent_id: str | None,
    limits: Sequence[str],
    yes: bool,
    as_json: bool,
) -> None:
    """Refill one key's buckets (all its limits, or those named)."""
    ext = _ext(ctx)
    fingerprint = ext.keyspace.fingerprint("api_key", api_key)
    if limits:
        what = ", ".join(limits)
    elif agent_id is None:
        what = "every limit keyed by API key"
    else:
        what = "every limit keyed by agent"
    who = f"key {fingerprint}" + ("" if agent_id is None else " (one agent)")
    if not yes and not click.confirm(f"Refill {what} of {who}?", err=True):
        raise click.ClickException("nothing reset")
    done = report.reset_limits(ext, api_key, limits, agent_id)
    _emit(
        done,
        as_json,
        lambda d: (
            f"reset {', '.join(d['limits'])} of key {d['key']}: "
            f"{d['deleted']} bucket key(s) deleted"
        ),
    )


@throttle.command()
@click.argument("value", required=False)
@_JSON
@click.pass_context
@_one_line_errors
def factor(ctx: click.Context, value: str | None, as_json: bool) -> None:
    """Show the load factor, or set (0 < VALUE <= 1) or clear the operator's override."""
    store = _ext(ctx).store()
    if value is None:
        found = store.load_factor()
    else:
        found = store.override_load_factor(report.parse_override(value))
    data = report.factor_fields(found)
    _emit(data, as_json, _factor_text)


@throttle.command()
@click.option("--minutes", default=None, type=int, help="Window (default: all counts kept).")
@click.option("--headroom", default=2.5, show_default=True, type=float, help="Limit / peak.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(1), help="Keys shown.")
@_JSON
@click.pass_context
@_one_line_errors
def suggest(
    ctx: click.Context, minutes: int | None, headroom: float, top: int, as_json: bool
) -> None:
    """Limits that fit each key's observed peak, and keys limited too tightly."""
    found = report.suggest_report(_ext(ctx), minutes=minutes, headroom=headroom, top=top)
    _emit(found, as_json, _suggest_text)


def _dims(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigurationError("--dim", f"got {pair!r}", "NAME=VALUE")
        out[name] = value
    return out


# -- text ----------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "(global)"
    return str(value)


def _seconds(value: float) -> str:
    return "now" if value <= 0 else f"in {value:.3g} s"


def _factor_text(data: dict[str, Any]) -> str:
    override = data["override"]
    return (
        f"load factor in force {data['in_force']:.3g} (computed {data['computed']:.3g}, "
        f"override {'none' if override is None else f'{override:.3g}'})"
    )


def _status_text(data: dict[str, Any]) -> str:
    parts = [f"store {data['store']['url']} (prefix {data['store']['prefix']})"]
    parts.append(_factor_text(data["factor"]))
    parts.append("")
    parts.append(
        _table(
            ["tier", "limit", "rate", "burst", "unit", "per", "algorithm", "mode"],
            [
                [
                    r["tier"],
                    r["limit"],
                    r["rate"],
                    r["burst"],
                    r["unit"],
                    r["per"],
                    r["algorithm"],
                    r["mode"],
                ]
                for r in data["limits"]
            ],
        )
    )
    parts.append("")
    if "counts" in data:
        parts.append(f"busiest keys: counts are {data['counts']}")
    elif not data["keys"]:
        parts.append(f"busiest keys: no traffic in the last {data['minutes']} minute(s)")
    else:
        parts.append(f"busiest keys, last {data['minutes']} minute(s):")
        rows = []
        for k in data["keys"]:
            left = "; ".join(
                f"{s['limit']} {_cell(float(s['remaining']))}/{_cell(float(s['burst']))}"
                for s in k["limits"]
                if s["mode"] == "enforce"
            )
            rows.append(
                [
                    k["key"],
                    k["tier"],
                    k["admitted_per_minute"],
                    f"{k['deferred_share']:.0%}",
                    left or "-",
                    k["upstream_factor"],
                    k["bookings"],
                    _seconds(k["next_free_s"]),
                ]
            )
        parts.append(
            _table(
                [
                    "key",
                    "tier",
                    "admitted/min",
                    "deferred",
                    "left",
                    "upstream",
                    "bookings",
                    "next free",
                ],
                rows,
            )
        )
    parts.append("")
    if data["workers"]:
        parts.append(
            _table(
                ["worker", "cpu %", "memory %", "busy"],
                [[w["worker"], w["cpu"], w["memory"], w["busy"]] for w in data["workers"]],
            )
        )
    else:
        parts.append("live workers: none reporting load (adaptive limits off, or none running)")
    return "\n".join(parts)


def _identity_text(data: dict[str, Any]) -> str:
    head = f"key {data['key']}"
    if data["agent"]:
        head += f", agent {data['agent']}"
    head += (
        f", tier {data['tier']}: load factor {data['load_factor']:.3g}, upstream factor "
        f"{data['upstream_factor']:.3g}, {data['bookings']} booking(s) waiting"
    )
    rows = []
    for r in data["limits"]:
        if "missing" in r:
            hints = ["--agent-id" if d == "agent_id" else f"--dim {d}=VALUE" for d in r["missing"]]
            note = f"{r['buckets']} bucket(s); pass {' '.join(hints)}"
            rows.append([r["limit"], r["rate"], r["burst"], r["unit"], note, "", ""])
        else:
            rows.append(
                [
                    r["limit"],
                    r["rate"],
                    r["burst"],
                    r["unit"],
                    r["remaining"],
                    _seconds(r["full_in_s"]),
                    _seconds(r["next_free_s"]),
                ]
            )
    table = _table(["limit", "rate", "burst", "unit", "left", "full", "next unit"], rows)
    return head + "\n\n" + table


def _suggest_text(data: dict[str, Any]) -> str:
    if not data["rows"]:
        return f"no traffic counted in the last {data['minutes']} minute(s)"
    rows = [
        [
            r["key"],
            r["tier"],
            r["limit"],
            r["configured_per_minute"],
            r["peak_per_minute"],
            r["proposed_per_minute"],
            f"{r['deferred_share']:.0%}",
            "too tight" if r["too_tight"] else "",
            r["would_deny"] if r["mode"] == "shadow" else "",
        ]
        for r in data["rows"]
    ]
    head = (
        f"last {data['minutes']} minute(s); proposed = {data['headroom']:g} x the busiest "
        "minute, in units per minute"
    )
    table = _table(
        [
            "key",
            "tier",
            "limit",
            "limit/min",
            "peak/min",
            "proposed/min",
            "deferred by it",
            "",
            "shadow denials",
        ],
        rows,
    )
    return head + "\n\n" + table
