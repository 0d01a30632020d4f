"""Middleware: code wrapped around every handler attempt, and around every publish, composed once per subscription."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

from ..errors import Refuse
from ..message import Message
from ..topics import REPLY_TO

#: The rest of the chain around a handler attempt: call it with the message, get the handler's return value.
CallNext = Callable[[Message], Awaitable[Any]]
#: The rest of the chain of a publish: call it with the outgoing message, get its id (a list for a batch).
PublishNext = Callable[["Outgoing"], Awaitable[Any]]
#: The rest of the chain around a batch handler's attempt: call it with the batch's messages, get its return value.
BatchNext = Callable[[list[Message]], Awaitable[Any]]
#: One attempt's call of a batch handler: (payloads, their messages, the bus) -> the handler's return value.
BatchCall = Callable[[Any, "list[Message] | None", Any], Awaitable[Any]]
#: One attempt's call: (payload, metadata, the bus) -> the handler's return value.
Call = Callable[[Any, "Message | None", Any], Awaitable[Any]]
C = TypeVar("C", Call, BatchCall)


class Middleware(Protocol):
    """``async def mw(message, call_next)`` around each attempt; it may also have ``async def on_publish(outgoing,
    call_next)`` around each publish and ``async def on_batch(messages, call_next)`` around each attempt of a batch
    handler. Any side alone is fine: a class with only `on_publish` touches no attempt."""

    async def __call__(self, message: Message, call_next: CallNext) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A publish as the publish side of a middleware sees it; pass `with_properties(...)` (or a `replace`d copy)
    on to change it. `payload` is the list of payloads for `publish_batch`, with `batch` True."""

    topic: str
    payload: Any
    key: str | bytes | None = None
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    deliver_after: timedelta | float | None = None
    event_time: datetime | int | None = None
    sequence_id: int | None = None
    batch: bool = False

    def with_properties(self, **properties: str) -> Outgoing:
        """A copy with these properties added (or replaced)."""
        return dataclasses.replace(self, properties={**self.properties, **properties})

    def options(self) -> dict[str, Any]:
        """The keyword options of `publish` (or of `publish_batch`) that this publish carries."""
        out: dict[str, Any] = {"key": self.key, "properties": self.properties or None}
        for name in ("deliver_after", "event_time") + (() if self.batch else ("sequence_id",)):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def checked(middleware: Sequence[object], where: str) -> tuple[object, ...]:
    """The middleware as given, once each is an async function of (message, call_next), an object with an async
    `on_publish`, or both; `TypeError` naming the fix otherwise."""
    if isinstance(middleware, (str, bytes)) or not isinstance(middleware, Sequence):
        raise TypeError(f"{where}: middleware=[...] takes a list of middleware, not {type(middleware).__name__}")
    for item in middleware:
        if consume_side(item) is None and publish_side(item) is None and batch_side(item) is None:
            raise TypeError(
                f"{where}: middleware {item!r} is neither `async def mw(message, call_next)` nor an object with "
                "`async def on_publish(outgoing, call_next)` or `async def on_batch(messages, call_next)`: make it "
                "one of them"
            )
    return tuple(middleware)


def consume_side(item: object) -> Callable[[Message, CallNext], Awaitable[Any]] | None:
    if inspect.iscoroutinefunction(item) or inspect.iscoroutinefunction(getattr(item, "__call__", None)):
        return item  # type: ignore[return-value]
    return None


def batch_side(item: object) -> Callable[[list[Message], BatchNext], Awaitable[Any]] | None:
    on_batch = getattr(item, "on_batch", None)
    return on_batch if inspect.iscoroutinefunction(on_batch) else None


def publish_side(item: object) -> Callable[[Outgoing, PublishNext], Awaitable[Any]] | None:
    on_publish = getattr(item, "on_publish", None)
    return on_publish if inspect.iscoroutinefunction(on_publish) else None


def around_attempt(call: Call, middleware: Sequence[object]) -> Call:
    """`call` inside the consume sides of `middleware`, the first outermost; `call` itself without any."""
    return _wrapped(call, middleware, consume_side, _layer)


def around_batch(call: BatchCall, middleware: Sequence[object]) -> BatchCall:
    """A batch handler's `call` inside the `on_batch` sides of `middleware`, the first outermost."""
    return _wrapped(call, middleware, batch_side, _batch_layer)


def around_handler(call: Call, middleware: Sequence[object], *, batch: bool) -> tuple[Call, bool]:
    """A handler's `call` inside the attempt sides of `middleware` (`on_batch` for a batch handler), and whether
    they need the `Message`s (the call must then be given them)."""
    if batch:
        wrapped = cast(Call, around_batch(cast(BatchCall, call), middleware))  # a batch handler's call takes lists
        return wrapped, any(map(batch_side, middleware))
    return around_attempt(call, middleware), any(map(consume_side, middleware))


def _wrapped(call: C, middleware: Sequence[object], side_of: Callable[[object], Any], layer: Callable[[Any, C], C]) -> C:
    for item in reversed(middleware):
        side = side_of(item)
        if side is not None:
            call = layer(side, call)
    return call


def _layer(side: Callable[[Message, CallNext], Awaitable[Any]], inner: Call) -> Call:
    async def layer(payload: Any, message: Message | None, bus: Any) -> Any:
        assert message is not None  # a subscription with middleware always makes the Message
        calls = 0

        def call_next(given: Message) -> Awaitable[Any]:
            nonlocal calls
            calls += 1
            if calls > 1:  # the handler's side effects twice in one attempt, its outputs published twice
                raise MiddlewareError(f"middleware {_name(side)} called call_next twice in one attempt: call it once")
            return inner(payload, given, bus)

        result = await side(message, call_next)
        if calls == 0 and REPLY_TO in message.properties:
            # A requester would take the middleware's return value for the handler's answer.
            raise Refuse(f"middleware {_name(side)} returned without calling the handler")
        return result

    return layer


def _batch_layer(side: Callable[[list[Message], BatchNext], Awaitable[Any]], inner: BatchCall) -> BatchCall:
    async def layer(payloads: Any, messages: Any, bus: Any) -> Any:
        calls = 0

        def call_next(given: list[Message]) -> Awaitable[Any]:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise MiddlewareError(f"middleware {_name(side)}.on_batch called call_next twice in one attempt: call it once")
            if len(given) != len(payloads):  # the handler's items are the batch's, position by position
                raise MiddlewareError(
                    f"middleware {_name(side)}.on_batch passed {len(given)} messages of a batch of {len(payloads)}: "
                    "pass them all (to fail some, raise BatchFailed after call_next)"
                )
            return inner(payloads, given, bus)

        result = await side(list(messages), call_next)
        if calls == 0 and any(REPLY_TO in m.properties for m in messages):
            raise Refuse(f"middleware {_name(side)}.on_batch returned without calling the handler")
        return result

    return layer


class MiddlewareError(RuntimeError):
    """A middleware broke the chain's contract (call_next skipped, called twice, or its result not returned)."""


def _name(side: object) -> str:
    owner = getattr(side, "__self__", None)
    named = owner if owner is not None and not isinstance(owner, type) else side
    return getattr(named, "__qualname__", None) or type(named).__qualname__


def around_publish(send: PublishNext, middleware: Sequence[object]) -> PublishNext | None:
    """`send` inside the publish sides of `middleware`, the first outermost; None when none has one."""
    sides = [side for side in map(publish_side, middleware) if side is not None]
    if not sides:
        return None
    for side in reversed(sides):
        send = _publish_layer(side, send)
    return send


def _publish_layer(side: Callable[[Outgoing, PublishNext], Awaitable[Any]], inner: PublishNext) -> PublishNext:
    async def layer(outgoing: Outgoing) -> Any:
        sent: list[Any] = []

        async def call_next(given: Outgoing) -> Any:
            if sent:
                raise MiddlewareError(f"middleware {_name(side)}.on_publish called call_next twice: call it once")
            sent.append(await inner(given))
            return sent[0]

        result = await side(outgoing, call_next)
        # A publish the chain did not send, or whose id it kept back, would let a handler's input be acknowledged
        # with its output never stored (or a caller hold a wrong id): the publish fails instead, and so the attempt.
        if not sent:
            raise MiddlewareError(
                f"middleware {_name(side)}.on_publish returned without calling call_next: the publish to "
                f"{outgoing.topic} was not sent; call `return await call_next(outgoing)`"
            )
        if result is not sent[0]:
            raise MiddlewareError(
                f"middleware {_name(side)}.on_publish returned {type(result).__name__}, not call_next's result: the "
                f"publish to {outgoing.topic} was sent but its id was lost; `return await call_next(outgoing)`"
            )
        return result

    return layer
