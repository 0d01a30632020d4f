"""A handler wrapped once, at registration: how its payload is decoded and how it is called."""

from __future__ import annotations

import abc
import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypedDict, Unpack

import anyio

from .codec import Decoder, decoder_for
from .message import Message, MessageId


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

    `wants_message` says whether the call needs the `Message`; sync functions run in a thread.
    """

    def __init__(self, func: Callable[..., Any], where: str) -> None:
        self.func = func
        self.name = handler_name(func)
        #: Where it was registered, for errors: ``@subscribe('orders', 'billing') on app.charge``.
        self.where = where
        self.decode, self.payload_type, positional, payload_name, message_name, bus_name = _analyse(func, where)
        self.wants_message = message_name is not None
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

        self.call: Call = _build_call(func, self.is_async, positional, payload_name, message_name, bus_name)

    def __repr__(self) -> str:
        return f"Handler({self.name})"


def _build_call(
    func: Callable[..., Any],
    is_async: bool,
    positional: bool,
    payload_name: str | None,
    message_name: str | None,
    bus_name: str | None,
) -> Call:
    """The call of `func` with what it asks for; the common shapes get a closure of their own (per message)."""
    if is_async and message_name is None and bus_name is None:
        if payload_name is None:
            return lambda payload, message, bus: func()
        if positional:
            return lambda payload, message, bus: func(payload)
        return lambda payload, message, bus: func(**{payload_name: payload})

    def arguments(payload: Any, message: Message | None, bus: Publisher) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if payload_name is not None and not positional:
            kwargs[payload_name] = payload
        if message_name is not None:
            kwargs[message_name] = message
        if bus_name is not None:
            kwargs[bus_name] = bus
        return ((payload,) if positional else ()), kwargs

    if is_async:

        async def call(payload: Any, message: Message | None, bus: Publisher) -> None:
            args, kwargs = arguments(payload, message, bus)
            await func(*args, **kwargs)

        return call

    async def call_in_thread(payload: Any, message: Message | None, bus: Publisher) -> None:
        args, kwargs = arguments(payload, message, bus)
        # A thread cannot be stopped: cancelled (timeout, drain), it runs on, abandoned.
        result = await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), abandon_on_cancel=True)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"{handler_name(func)} is a plain function that returned {type(result).__name__}, which nobody "
                "awaits: make it `async def`, or give its decorator functools.wraps of an async function"
            )

    return call_in_thread


def _analyse(
    func: Callable[..., Any], where: str
) -> tuple[Decoder, Any, bool, str | None, str | None, str | None]:
    """The payload decoder and type, whether the payload goes by position, and the parameters that receive each part."""
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
    for param in signature.parameters.values():
        annotation = hints.get(param.name, param.annotation)
        if annotation is Message:
            message_name = param.name
        elif isinstance(annotation, type) and issubclass(annotation, Publisher):
            bus_name = param.name
        elif decode is None and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            try:
                decode = decoder_for(annotation)
            except TypeError as exc:
                raise TypeError(f"{where}: {exc}") from None
            payload_type = Any if annotation is param.empty else annotation
            payload_name = param.name
            # Positional-only (builtins such as list.append) cannot take it by name;
            # the first parameter takes it by position, which is quicker.
            positional = param.kind == param.POSITIONAL_ONLY or param is next(iter(signature.parameters.values()))
        elif param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"{where}: parameter {param.name!r} has nothing to receive; "
                "annotate it with Message or EventBus, or give it a default"
            )
    if decode is None:
        decode = decoder_for(inspect.Parameter.empty)
    return decode, payload_type, positional, payload_name, message_name, bus_name
