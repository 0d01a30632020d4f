"""Injected dependencies: `Depends(provider)`, a handler's providers solved once into a plan, made per worker or per attempt."""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio

Scope = Literal["app", "message"]
#: What a parameter that is not a dependency receives, if anything: the message's metadata or the bus.
Role = Literal["message", "bus"] | None
Provider = Callable[..., Any]
#: Where an argument of a provider comes from: ("value", provider), ("message", None) or ("bus", None).
Source = tuple[Literal["value", "message", "bus"], Any]
Kind = Literal["async", "sync", "asyncgen", "gen"]


@dataclass(frozen=True)
class Depends:
    """A parameter whose value a provider makes: ``db: Annotated[Database, Depends(get_db)]``.

    The provider may be a plain or async function, or a (sync or async) generator whose code after
    `yield` runs when the scope ends. ``scope="message"`` (the default) makes it once per handler
    attempt and closes it after the attempt (an exception of the handler is raised at its `yield`);
    ``scope="app"`` once per worker, before the first message, closed after the drain. A provider's
    own parameters may be dependencies too, or annotated with `Message` or `EventBus`.
    """

    provider: Provider
    scope: Scope = "message"

    def __post_init__(self) -> None:
        if not callable(self.provider):
            raise TypeError(f"Depends({self.provider!r}): the provider must be a function (or a class) that makes the value")
        if self.scope not in ("app", "message"):
            raise ValueError(
                f"Depends({_name(self.provider)}, scope={self.scope!r}): scope is 'message' (once per attempt) "
                "or 'app' (once per worker)"
            )


@dataclass(frozen=True)
class Step:
    """One provider to call: the function (an override's, if any) and where each argument comes from."""

    key: Provider  # the provider as declared, which names the value even when overridden
    func: Provider
    kind: Kind
    arguments: tuple[tuple[str, Source], ...]


@dataclass(frozen=True)
class Plan:
    """A handler's dependencies, solved: providers in the order they are made, each after what it needs."""

    app: tuple[Step, ...] = ()
    message: tuple[Step, ...] = ()
    #: Handler parameter -> the provider whose value it receives.
    parameters: tuple[tuple[str, Provider], ...] = ()
    needs_message: bool = False

    async def resolve(self, app: Mapping[Provider, Any], message: Any, bus: Any, stack: contextlib.AsyncExitStack) -> dict[str, Any]:
        """The handler's dependency arguments for one attempt; generators' cleanups go on `stack`."""
        values: dict[Provider, Any] = dict(app)
        for step in self.message:
            values[step.key] = await make(step, _arguments(step, values, message, bus), stack)
        return {name: values[key] for name, key in self.parameters}


def depends_of(parameter: inspect.Parameter, annotation: Any) -> Depends | None:
    """The `Depends` of a parameter: in its `Annotated[...]` annotation (with extras) or as its default."""
    if typing.get_origin(annotation) is typing.Annotated:
        found = [extra for extra in annotation.__metadata__ if isinstance(extra, Depends)]
        if found:
            return found[-1]
    return parameter.default if isinstance(parameter.default, Depends) else None


def annotations_of(func: Callable[..., Any]) -> dict[str, Any]:
    """The function's resolved annotations, `Annotated` kept ({} when they cannot be resolved)."""
    target = func.__init__ if inspect.isclass(func) else func
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:
        return {}


def solve(
    parameters: Mapping[str, Depends], where: str, role: Callable[[Any], Role],
    overrides: Mapping[Provider, Provider] | None = None,
) -> Plan:
    """The plan for a handler's dependency `parameters`; `TypeError` naming the handler and the parameter when a
    provider needs what nothing gives, depends on itself, or an app-scoped one needs a message-scoped value."""
    solver = _Solver(where, role, overrides or {})
    out: list[tuple[str, Provider]] = []
    for name, depends in parameters.items():
        solver.root = f"parameter {name!r}"
        solver.visit(depends, solver.root)
        out.append((name, depends.provider))
    return Plan(tuple(solver.app), tuple(solver.message), tuple(out), solver.needs_message)


class _Solver:
    def __init__(self, where: str, role: Callable[[Any], Role], overrides: Mapping[Provider, Provider]) -> None:
        self.where, self.role, self.overrides = where, role, overrides
        self.app: list[Step] = []
        self.message: list[Step] = []
        self.scopes: dict[Provider, Scope] = {}
        self.visiting: list[Provider] = []
        self.needs_message = False
        self.root = ""

    def visit(self, depends: Depends, path: str) -> None:
        key = depends.provider
        if key in self.visiting:
            cycle = " -> ".join(map(_name, [*self.visiting[self.visiting.index(key):], key]))
            raise TypeError(f"{self.where}: {self.root} needs a cycle of providers, {cycle}: break it")
        path = f"{path}: {_name(key)}"
        known = self.scopes.get(key)
        if known is not None:
            if known != depends.scope:
                raise TypeError(f"{self.where}: {path} is declared with scope {known!r} and {depends.scope!r}: pick one")
            return
        self.visiting.append(key)
        func = self.overrides.get(key, key)
        arguments = tuple(self._arguments(func, depends.scope, path))
        self.visiting.pop()
        self.scopes[key] = depends.scope
        (self.app if depends.scope == "app" else self.message).append(Step(key, func, _kind(func), arguments))

    def _arguments(self, func: Provider, scope: Scope, path: str) -> Iterable[tuple[str, Source]]:
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self.where}: {path}: cannot read the provider's signature: {exc}") from None
        hints = annotations_of(func)
        for param in signature.parameters.values():
            annotation = hints.get(param.name, param.annotation)
            inner = depends_of(param, annotation)
            if inner is not None:
                self.visit(inner, path)
                if scope == "app" and inner.scope == "message":
                    raise TypeError(
                        f"{self.where}: {path} is app-scoped but needs {_name(inner.provider)}, made per message: "
                        "make that one scope='app' too"
                    )
                yield param.name, ("value", inner.provider)
                continue
            given = self.role(typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation)
            if given == "message" and scope == "app":
                raise TypeError(f"{self.where}: {path} is app-scoped and cannot receive the Message: use scope='message'")
            if given is not None:
                self.needs_message = self.needs_message or given == "message"
                yield param.name, (given, None)
            elif param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(
                    f"{self.where}: {path}: its parameter {param.name!r} has nothing to receive; annotate it with "
                    "Annotated[T, Depends(provider)], Message or EventBus, or give it a default"
                )


class AppScope:
    """One worker's app-scoped values: made before the first message, closed (in reverse) after the drain.

    `overrides` replace providers (the test kit's `dependency_overrides`), in every scope.
    """

    def __init__(self, overrides: Mapping[Provider, Provider] | None = None) -> None:
        self.overrides: dict[Provider, Provider] = dict(overrides or {})
        self.values: dict[Provider, Any] = {}

    async def open(self, plans: Iterable[Plan], bus: Any, stack: contextlib.AsyncExitStack) -> None:
        """Make every app-scoped value the plans need, once each; their cleanups go on `stack`."""
        for plan in plans:
            for step in plan.app:
                if step.key not in self.values:
                    self.values[step.key] = await make(step, _arguments(step, self.values, None, bus), stack)


async def make(step: Step, arguments: dict[str, Any], stack: contextlib.AsyncExitStack) -> Any:
    """Call a provider: plain functions in a thread (they may block), generators entered on `stack`."""
    kind, func = step.kind, step.func
    if kind == "async":
        return await func(**arguments)
    if kind == "asyncgen":
        return await stack.enter_async_context(contextlib.asynccontextmanager(func)(**arguments))
    if kind == "gen":
        return await stack.enter_async_context(_in_thread(contextlib.contextmanager(func)(**arguments)))
    return await anyio.to_thread.run_sync(functools.partial(func, **arguments))


def _arguments(step: Step, values: Mapping[Provider, Any], message: Any, bus: Any) -> dict[str, Any]:
    given = {"message": message, "bus": bus}
    return {name: values[ref] if what == "value" else given[what] for name, (what, ref) in step.arguments}


@contextlib.asynccontextmanager
async def _in_thread(manager: contextlib.AbstractContextManager[Any]) -> AsyncIterator[Any]:
    """A sync generator's context, entered and left in a thread; the scope's exception is raised at its `yield`."""
    value = await anyio.to_thread.run_sync(manager.__enter__)
    try:
        yield value
    except BaseException as exc:
        if not await anyio.to_thread.run_sync(manager.__exit__, type(exc), exc, exc.__traceback__):
            raise
    else:
        await anyio.to_thread.run_sync(manager.__exit__, None, None, None)


def _kind(func: Provider) -> Kind:
    target = inspect.unwrap(func)
    if inspect.isasyncgenfunction(target):
        return "asyncgen"
    if inspect.isgeneratorfunction(target):
        return "gen"
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None)):
        return "async"
    return "sync"


def _name(func: object) -> str:
    qualname = getattr(func, "__qualname__", None) or repr(func)
    return f"{getattr(func, '__module__', None) or '?'}.{qualname}"
