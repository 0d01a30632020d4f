"""A handler wrapped once, at registration: how its payload is decoded and how it is called."""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypedDict, Unpack

import anyio

from ..codec import Decoder, decoder_for
from ..message import Message, MessageId
from .dependencies import AppScope, Depends, Plan, Role, annotations_of, depends_of, solve

log = logging.getLogger("eventbus")


class BatchOptions(TypedDict, total=False):
    """How `publish_batch` sends: what `publish` takes but `sequence_id`."""

    #: Orders the messages of one key on ordered subscriptions (bytes: a key that is not UTF-8).
    key: str | bytes | None
    properties: Mapping[str, str] | None
    #: Holds the message back (seconds or a timedelta) on Apache Pulsar's shared and key_shared subscriptions.
    deliver_after: timedelta | float | None
    event_time: datetime | int | None


class PublishOptions(BatchOptions, total=False):
    """How `publish` sends (keyword arguments of `publish`, one definition for the bus, the ABC and the test kit)."""

    #: With a stable `EVENTBUS_PRODUCER_NAME` and deduplication on the namespace, a resend of the same id is a no-op.
    sequence_id: int | None


class Publisher(abc.ABC):
    """The bus as a handler sees it; `EventBus` is one. Annotate a parameter with either to receive it."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: Any, **options: Unpack[PublishOptions]) -> Coroutine[Any, Any, MessageId]: ...

    @abc.abstractmethod
    def publish_batch(
        self, topic: str, payloads: Iterable[Any], **options: Unpack[BatchOptions]
    ) -> Coroutine[Any, Any, list[MessageId]]: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


def handler_name(func: object) -> str:
    """``module.qualname`` of a callable, for logs and errors."""
    module = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{module}.{name}"


#: Builds the call of a handler: (payload, the message's metadata or None, the bus) -> awaitable.
Call = Callable[[Any, "Message | None", Publisher], Awaitable[Any]]


class Handler:
    """A registered function, analysed once: `decode` turns bytes into its `payload_type`, `call` runs it.

    `wants_message` says whether the call needs the `Message`; sync functions run in a thread. Parameters
    marked `Depends(...)` are solved into `plan` here, so a missing or cyclic dependency fails at import.
    """

    def __init__(self, func: Callable[..., Any], where: str, *, batch: bool = False) -> None:
        """`batch`: the handler takes a list of payloads (and of `Message`s), decoded each as the list's items."""
        self.func = func
        self.name = handler_name(func)
        #: Where it was registered, for errors: ``@subscribe('orders', 'billing') on app.charge``.
        self.where = where
        self.decode, self.payload_type, positional, payload_name, message_name, bus_name, self.dependencies = _analyse(
            func, where, batch
        )
        self.plan = solve(self.dependencies, where, _role)
        if batch and self.plan.needs_message:
            raise TypeError(
                f"{where}: a batch handler's dependencies cannot take the Message (a batch has many): "
                "take `messages: list[Message]` in the handler instead"
            )
        self.wants_message = message_name is not None or self.plan.needs_message
        #: What it is annotated to return (Any when it is not); None for `-> None`.
        self.return_type = _return_type(func)
        #: Not annotated `-> None`: what it returns is worth a look (a reply, `returns_to`, a warning).
        self.may_return = self.return_type is not None
        # Async if the function called is, or what it wraps is: an async decorator around a sync function
        # (functools.wraps) was run in a thread, its coroutine never awaited and the handler never run.
        self.is_async = any(
            inspect.iscoroutinefunction(f) or inspect.iscoroutinefunction(getattr(f, "__call__", None))
            for f in (func, inspect.unwrap(func))
        )
        self.parameters = tuple(
            (name, role)
            for name, role in ((payload_name, "payload"), (message_name, "message"), (bus_name, "bus"))
            if name is not None
        )
        self._shape = _Shape(func, self.is_async, positional, payload_name, message_name, bus_name)
        self.call: Call = _build_call(self._shape)

    def __repr__(self) -> str:
        return f"Handler({self.name})"

    def plan_for(self, overrides: Mapping[Callable[..., Any], Callable[..., Any]]) -> Plan:
        """The dependency plan with `overrides` replacing providers."""
        return solve(self.dependencies, self.where, _role, overrides) if overrides and self.dependencies else self.plan

    def binding(self, app: AppScope) -> tuple[Call, bool]:
        """The call with its dependencies made from `app` (the plain `call` without any), and whether it needs the
        `Message` (a provider may ask for it)."""
        if not self.dependencies:
            return self.call, self.wants_message
        plan = self.plan_for(app.overrides)
        return _dependent_call(self._shape, plan, app.values), self.wants_message or plan.needs_message


def _item(annotation: Any, name: str) -> Any:
    """What a batch handler's payloads are, from its `list[T]` annotation."""
    if annotation in (list, inspect.Parameter.empty, Any):
        return Any
    if typing.get_origin(annotation) is list:
        return (typing.get_args(annotation) or (Any,))[0]
    raise TypeError(f"a batch handler takes a list of payloads: annotate {name!r} as list[{_type_name(annotation)}]")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__qualname__", None) or repr(annotation)


def _return_type(func: Callable[..., Any]) -> Any:
    try:
        returns = typing.get_type_hints(func).get("return", inspect.signature(func).return_annotation)
    except Exception:
        return Any
    if returns in (None, type(None), typing.NoReturn, typing.Never):
        return None
    return Any if returns is inspect.Signature.empty else returns


def _role(annotation: Any) -> Role:
    """What a parameter annotated so receives: the message's metadata, the bus, or neither."""
    if annotation is Message:
        return "message"
    return "bus" if isinstance(annotation, type) and issubclass(annotation, Publisher) else None


class _Shape(typing.NamedTuple):
    """How a handler takes what it is given."""

    func: Callable[..., Any]
    is_async: bool
    positional: bool
    payload_name: str | None
    message_name: str | None
    bus_name: str | None

    def arguments(self, payload: Any, message: Message | None, bus: Publisher) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.payload_name is not None and not self.positional:
            kwargs[self.payload_name] = payload
        if self.message_name is not None:
            kwargs[self.message_name] = message
        if self.bus_name is not None:
            kwargs[self.bus_name] = bus
        return ((payload,) if self.positional else ()), kwargs

    async def invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.is_async:
            return await self.func(*args, **kwargs)
        func = self.func
        # A thread cannot be stopped: cancelled (timeout, drain), it runs on, abandoned.
        result = await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), abandon_on_cancel=True)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"{handler_name(func)} is a plain function that returned {type(result).__name__}, which nobody "
                "awaits: make it `async def`, or give its decorator functools.wraps of an async function"
            )
        return result


def _build_call(shape: _Shape) -> Call:
    """The call of the function with what it asks for; the common shapes get a closure of their own (per message)."""
    func, payload_name = shape.func, shape.payload_name
    if shape.is_async and shape.message_name is None and shape.bus_name is None:
        if payload_name is None:
            return lambda payload, message, bus: func()
        if shape.positional:
            return lambda payload, message, bus: func(payload)
        return lambda payload, message, bus: func(**{payload_name: payload})

    async def call(payload: Any, message: Message | None, bus: Publisher) -> Any:
        return await shape.invoke(*shape.arguments(payload, message, bus))

    return call


def _dependent_call(shape: _Shape, plan: Plan, app: Mapping[Callable[..., Any], Any]) -> Call:
    """The call of a handler with dependencies: made for the attempt, closed after it, the handler's error raised
    at each generator's `yield`."""

    async def call(payload: Any, message: Message | None, bus: Publisher) -> Any:
        stack = contextlib.AsyncExitStack()
        try:
            args, kwargs = shape.arguments(payload, message, bus)
            kwargs.update(await plan.resolve(app, message, bus, stack))
            result = await shape.invoke(args, kwargs)
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise  # a dependency's cleanup swallowed it: the attempt fails all the same
        try:
            await stack.aclose()
        except Exception as exc:  # the handler's work is done: a retry would do it again
            log.error(
                "%s succeeded, then a dependency's cleanup raised (the message counts as handled; a retry would "
                "repeat the handler's work): %s", handler_name(shape.func), f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )
        return result

    return call


def _analyse(
    func: Callable[..., Any], where: str, batch: bool = False
) -> tuple[Decoder, Any, bool, str | None, str | None, str | None, dict[str, Depends]]:
    """The payload decoder and type, whether the payload goes by position, the parameters that receive each part,
    and the dependencies."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: cannot read the handler's signature: {exc}") from None
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        if any(isinstance(p.annotation, str) for p in signature.parameters.values()):
            raise TypeError(
                f"{where}: cannot resolve the handler's annotations ({exc}); define the types at module level"
            ) from None
        hints = {}
    decode: Decoder | None = None
    payload_type: Any = Any
    positional = False
    payload_name = message_name = bus_name = None
    dependencies: dict[str, Depends] = {}
    extras = annotations_of(func) if hints else {}
    for param in signature.parameters.values():
        annotation = hints.get(param.name, param.annotation)
        depends = depends_of(param, extras.get(param.name, param.annotation))
        if depends is not None:
            dependencies[param.name] = depends
        elif annotation is Message or (batch and annotation == list[Message]):
            message_name = param.name
        elif isinstance(annotation, type) and issubclass(annotation, Publisher):
            bus_name = param.name
        elif decode is None and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            try:
                decode = decoder_for(_item(annotation, param.name) if batch else annotation)
            except TypeError as exc:
                raise TypeError(f"{where}: {exc}") from None
            payload_type = Any if annotation is param.empty else _item(annotation, param.name) if batch else annotation
            payload_name = param.name
            # Positional-only (builtins such as list.append) cannot take it by name;
            # the first parameter takes it by position, which is quicker.
            positional = param.kind == param.POSITIONAL_ONLY or param is next(iter(signature.parameters.values()))
        elif param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"{where}: parameter {param.name!r} has nothing to receive; "
                "annotate it with Message or EventBus, Annotated[T, Depends(provider)], or give it a default"
            )
    if decode is None:
        decode = decoder_for(inspect.Parameter.empty)
    return decode, payload_type, positional, payload_name, message_name, bus_name, dependencies
