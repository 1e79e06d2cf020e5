# SPDX-License-Identifier: MIT
"""The task option: which limits a task is admitted against, at what cost, and for whom.

Two spellings end in the same task attribute, ``throttle_spec``::

    @app.task(throttle=["llm-requests", "agent-share"], throttle_cost={"llm-tokens": est})
    def step(...): ...

    @app.task
    @throttle.limit("llm-requests", "agent-share", cost={"llm-tokens": est})
    def step(...): ...

``throttle="100/m"`` is an inline rate keyed per API key, a drop-in for Celery's ``rate_limit``.
Options are checked as far as they can be at decoration (types, callables, rate syntax) and
against the app's settings when the task is registered (limit names).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar

from throttle.celeryext.settings import LimitPolicy
from throttle.errors import ConfigurationError, CostError
from throttle.limits import Limit, Rate, check_cost, finite_number

__all__ = ["TaskSpec", "limit", "spec_from_options"]

P = ParamSpec("P")
R = TypeVar("R")

CostFn = Callable[[tuple[Any, ...], dict[str, Any]], float]
IdentityFn = Callable[[tuple[Any, ...], dict[str, Any]], object]

#: The attribute a decorated function carries until its task is registered.
FUNCTION_ATTR: Final = "__throttle_options__"
#: Default identity: each dimension from the keyword argument of the same name.
DEFAULT_IDENTITY: Final[Mapping[str, str | IdentityFn]] = {
    "api_key": "api_key",
    "agent_id": "agent_id",
}
_OPTION_KEYS: Final = ("throttle", "throttle_cost", "throttle_identity")


@dataclass(frozen=True)
class TaskSpec:
    """A task's throttling, resolved against the app's settings."""

    #: Limit names in admission order (an inline rate's limit is named after the task).
    names: tuple[str, ...]
    #: The inline limit, for ``throttle="100/m"``.
    inline: LimitPolicy | None
    cost: Mapping[str, float | CostFn]
    identity: Mapping[str, str | IdentityFn]

    def costs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, float]:
        """Evaluate the cost of each limit for one call (numbers are checked by the store)."""
        out: dict[str, float] = {}
        for name, cost in self.cost.items():
            out[name] = cost(args, kwargs) if callable(cost) else cost
        return out

    def resolve_identity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, object]:
        """The identity of one call, from its arguments. A callable that raises is a
        :class:`ConfigurationError` naming the dimension."""
        out: dict[str, object] = {}
        for dim, source in self.identity.items():
            try:
                value = source(args, kwargs) if callable(source) else kwargs.get(source)
            except Exception as exc:  # a user callable, given arguments it did not expect
                raise ConfigurationError(
                    f"throttle_identity[{dim!r}]", f"the identity callable raised {exc!r}"
                ) from exc
            if value is not None:
                out[dim] = value
        return out


def limit(
    *names: str,
    cost: Mapping[str, float | CostFn] | float | CostFn | None = None,
    identity: Mapping[str, str | IdentityFn] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a task function for throttling; put it under ``@app.task``.

    ``names`` are limit names from ``throttle_limits`` (or one inline rate such as ``"100/m"``).
    ``cost`` maps limit names to a number or ``callable(args, kwargs) -> units`` (or is one such
    number or callable, for every limit); ``identity``
    maps dimensions to a keyword argument name or ``callable(args, kwargs) -> value``.
    """
    options = check_options(
        {"throttle": list(names), "throttle_cost": cost, "throttle_identity": identity},
        where="throttle.limit()",
    )

    def mark(fun: Callable[P, R]) -> Callable[P, R]:
        if not callable(fun):
            raise ConfigurationError("throttle.limit()", "must decorate a function")
        # Celery copies the function's attributes onto the task class only for some options,
        # so the marker travels on the function and is read when the task is registered.
        target = fun
        if hasattr(fun, "run") and hasattr(fun, "name"):  # already a task: decorators reversed
            raise ConfigurationError(
                "throttle.limit()",
                "was applied on top of @app.task",
                "put @throttle.limit(...) below @app.task",
            )
        setattr(target, FUNCTION_ATTR, options)
        return fun

    return mark


def check_options(options: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Validate option types now (at decoration); names are checked at registration."""
    spec = options.get("throttle")
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list | tuple) or not spec:
        raise ConfigurationError(
            f"{where} throttle",
            f"expected limit names, got {spec!r}",
            "a limit name, a list of names, or an inline rate such as '100/m'",
        )
    for item in spec:
        if not isinstance(item, str) or not item:
            raise ConfigurationError(f"{where} throttle", f"not a limit name: {item!r}")
        if "/" in item and len(spec) > 1:
            raise ConfigurationError(
                f"{where} throttle",
                f"an inline rate ({item!r}) must be the only entry",
                "throttle='100/m', or define the limit in throttle_limits",
            )
        if "/" in item:
            Rate.parse(item, field=f"{where} throttle")
            try:  # a rate no bucket can keep (a count or a period out of range)
                Limit("inline", item)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{where} throttle", exc.problem, exc.accepted) from exc
    if len(set(spec)) != len(spec):
        raise ConfigurationError(f"{where} throttle", "a limit is listed twice")
    cost = options.get("throttle_cost")
    if cost is None:
        cost = {}
    elif not isinstance(cost, Mapping):
        # One number or callable for every limit of the task (and the only form that can name
        # an inline rate's limit).
        cost = dict.fromkeys(spec, cost)
    for name, value in cost.items():
        if name not in spec:
            raise ConfigurationError(
                f"{where} throttle_cost[{name!r}]", "names a limit the task is not throttled by"
            )
        number = finite_number(value)
        if not (callable(value) or (number is not None and number >= 0)):
            raise ConfigurationError(
                f"{where} throttle_cost[{name!r}]",
                f"must be a number or callable(args, kwargs), got {value!r}",
                "a finite number >= 0, or callable(args, kwargs) returning one",
            )
    identity = options.get("throttle_identity")
    identity = dict(DEFAULT_IDENTITY) if identity is None else dict(identity)
    for dim, source in identity.items():
        if not (isinstance(source, str) or callable(source)):
            raise ConfigurationError(
                f"{where} throttle_identity[{dim!r}]",
                f"must be a keyword argument name or callable(args, kwargs), got {source!r}",
            )
    return {"throttle": tuple(spec), "throttle_cost": dict(cost), "throttle_identity": identity}


def spec_from_options(
    task_name: str,
    options: Mapping[str, Any],
    policies: Mapping[str, LimitPolicy],
    dimensions: Sequence[str],
) -> TaskSpec:
    """Resolve checked options against the app's limits; unknown names are an error here."""
    where = f"task {task_name!r}"
    checked = check_options(options, where=where)
    names: tuple[str, ...] = checked["throttle"]
    inline = None
    if len(names) == 1 and "/" in names[0]:
        inline_name = _inline_name(task_name)
        inline = LimitPolicy(Limit(inline_name, names[0], dimensions=tuple(dimensions)))
        cost = {inline_name: v for v in checked["throttle_cost"].values()}  # noqa: B035 (one)
        names = (inline_name,)
    else:
        cost = checked["throttle_cost"]
        for name in names:
            if name not in policies:
                raise ConfigurationError(
                    f"{where} throttle",
                    f"unknown limit {name!r}",
                    ", ".join(sorted(policies)) or "(throttle_limits defines none)",
                )
    limits = {name: inline.limit if inline else policies[name].limit for name in names}
    for name, value in cost.items():
        if callable(value):
            continue
        try:
            check_cost(limits[name], value)
        except CostError as exc:
            raise ConfigurationError(f"{where} throttle_cost[{name!r}]", exc.problem) from exc
    for dim in checked["throttle_identity"]:
        if dim not in ("api_key", "agent_id", "tier", *dimensions):
            raise ConfigurationError(
                f"{where} throttle_identity[{dim!r}]",
                "unknown dimension",
                "api_key, agent_id, tier, or one of throttle_dimensions",
            )
    return TaskSpec(names, inline, cost, checked["throttle_identity"])


def options_of_class(cls: type) -> object:
    """The raw throttle marker of a task class (option or decorator), or None: cheap, for the
    moment the class is created."""
    marker = getattr(cls, "throttle", None)
    if marker is None:
        marker = getattr(getattr(cls, "run", None), FUNCTION_ATTR, None)
    return marker


def options_of(task: Any) -> dict[str, Any] | None:
    """The throttle options a task was given, by either spelling, or None. A ``throttle_*``
    option that does not exist (``@app.task(throttle_csot=...)``, which Celery would keep as a
    plain attribute) is an error naming it."""
    from_function = getattr(getattr(task, "run", None), FUNCTION_ATTR, None)
    unknown = sorted(
        name
        for name in vars(type(task))
        if name.startswith("throttle_") and name not in _OPTION_KEYS
    )
    if unknown:
        raise ConfigurationError(
            f"task {task.name!r} {unknown[0]}", "unknown option", ", ".join(_OPTION_KEYS)
        )
    attrs = {key: getattr(task, key, None) for key in _OPTION_KEYS}
    if attrs["throttle"] is not None and from_function is not None:
        raise ConfigurationError(
            f"task {task.name!r}", "has both throttle= and @throttle.limit(): use one"
        )
    if from_function is not None:
        return dict(from_function)
    if attrs["throttle"] is None:
        return None
    return attrs


def _inline_name(task_name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "_" for c in task_name)
    return ("task." + cleaned)[:64]
