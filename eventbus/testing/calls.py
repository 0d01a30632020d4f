"""One registered handler called on one payload as the worker would call it, with no broker: for unit tests."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Unpack

import anyio

from ..broker.client import id_text, new_message_id
from ..codec import DecodeError, decoder_for, encode
from ..consuming.attempts import HandlerTimeout, backoff, cancelled_by_us, verdict
from ..context import CURRENT, Attempt, caller, tracked
from ..errors import BatchFailed
from ..message import Message, MessageId
from ..observing.events import Published
from ..registry import Router, Subscription, default_router
from ..service.dependencies import AppScope, Provider
from ..service.handler import BatchOptions, Publisher, PublishOptions
from ..service.middleware import Outgoing, PublishNext, around_handler, around_publish
from ..settings import topic_problem

#: What the worker would do with the message after this call.
CallOutcome = Literal["ok", "retry", "refused", "dead_letter", "drop"]


class RecordingPublisher(Publisher):
    """A stand-in for the bus a handler receives: records each publish, stores nothing, and counts `stop()` calls.

    `responses` answer `request`: per topic (as the handler names it), a value, an exception to raise (e.g.
    `RequestFailed(reason="refused", error="out of stock")`), or a function of the request's payload.
    `middleware`: the publish sides run around each publish, as the worker runs its router's.
    """

    def __init__(
        self, tenant: str = "public", namespace: str = "default", *, responses: Mapping[str, Any] | None = None,
        middleware: Sequence[object] = (),
    ) -> None:
        self.published: list[Published] = []
        self.stopped = 0
        self.responses: dict[str, Any] = dict(responses or {})
        self._tenant, self._namespace = tenant, namespace
        self._entries = itertools.count()
        self._send: PublishNext = around_publish(self._sent, middleware) or self._sent

    def topic(self, name: str) -> str:
        problem = topic_problem(name)
        if problem:
            raise ValueError(problem)
        return name if "://" in name else f"persistent://{self._tenant}/{self._namespace}/{name}"

    def publish(self, topic: str, payload: Any, **options: Unpack[PublishOptions]) -> Coroutine[Any, Any, MessageId]:
        coroutine = self._sending(Outgoing(topic, payload, options.get("key"), dict(options.get("properties") or {})))
        tracked(coroutine, "publish", topic, caller())
        return coroutine

    def publish_batch(
        self, topic: str, payloads: Iterable[Any], **options: Unpack[BatchOptions]
    ) -> Coroutine[Any, Any, list[MessageId]]:
        properties = dict(options.get("properties") or {})
        coroutine = self._sending(Outgoing(topic, list(payloads), options.get("key"), properties, batch=True))
        tracked(coroutine, "publish_batch", topic, caller())
        return coroutine

    async def request(
        self, topic: str, payload: Any, *, key: str | bytes | None = None, timeout: float = 10.0,
        response_type: Any = None, properties: Mapping[str, str] | None = None,
    ) -> Any:
        """The request recorded as a publish, answered from `responses` and decoded as the bus decodes a reply."""
        if topic not in self.responses:
            raise LookupError(
                f"a request to {topic!r} has no response: pass call_handler(..., responses={{{topic!r}: ...}}) a "
                "value, an exception to raise, or a function of the payload"
            )
        decode = decoder_for(Any if response_type is None else response_type)
        await self.publish(topic, payload, key=key, properties=properties)
        answer = self.responses[topic]
        if callable(answer) and not isinstance(answer, type):
            answer = answer(payload)
            if inspect.isawaitable(answer):
                answer = await answer
        if isinstance(answer, BaseException):
            raise answer
        return decode(encode(answer)[0])

    async def _sending(self, outgoing: Outgoing) -> Any:
        return await self._send(outgoing)

    async def _sent(self, outgoing: Outgoing) -> Any:
        payloads = list(outgoing.payload) if outgoing.batch else [outgoing.payload]
        encoded = [encode(payload)[0] for payload in payloads]  # raises TypeError as the bus would, before any is kept
        ids = []
        for payload, data in zip(payloads, encoded):
            message_id = new_message_id(0, next(self._entries))
            self.published.append(
                Published(self.topic(outgoing.topic), outgoing.key, payload, dict(outgoing.properties), data, message_id)
            )
            ids.append(message_id)
        return ids if outgoing.batch else ids[0]

    def stop(self) -> None:
        self.stopped += 1


@dataclass(frozen=True)
class CallResult:
    """How one call went and what the worker would do next.

    `outcome`: ``ok`` (acknowledged), ``retry`` (after `retry_in` seconds, before jitter), ``refused``
    (acknowledged: the handler raised `Refuse`),
    ``dead_letter`` (to the subscription's dead-letter topic, for `reason`) or ``drop``
    (the same, with `dead_letter=False`). `reason`: ``handler-failed``, ``rejected`` or
    ``undecodable``. `published`: what the handler published through the bus it received.
    """

    outcome: CallOutcome
    message: Message
    error: BaseException | None = None
    reason: str | None = None
    retry_in: float | None = None
    published: list[Published] = field(default_factory=list)
    #: What the handler returned (what `returns_to` would publish, or a request's reply).
    returned: Any = None
    #: A batch handler's verdict on each item, in the order given, as the worker decides them (a `BatchFailed`
    #: fails only the items it names); the call's own outcome is then the first failed item's. Empty otherwise.
    items: tuple[CallResult, ...] = ()

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


async def _attempt(
    sub: Subscription, decoded: Any, message: Message, publisher: Publisher, overrides: Mapping[Provider, Provider],
    batch: list[Message] | None = None,
) -> Any:
    """The handler's call as the worker makes it: in an attempt context (log fields, publishes awaited), timed out,
    its app-scoped dependencies made for this call alone."""
    fields: dict[str, object] = {
        "topic": message.topic, "group": sub.group, "message_id": id_text(message.message_id), "key": message.key,
        "attempt": message.attempt,
    }
    current = Attempt(sub.name, lambda _message, _number: fields)
    current.begin(message, message.attempt)
    token = CURRENT.set(current)
    try:
        async with contextlib.AsyncExitStack() as stack:
            app = AppScope(overrides)
            await app.open([sub.handler.plan_for(app.overrides)], publisher, stack)
            call, wants_message = sub.handler.binding(app)
            call, wraps = around_handler(call, sub.middleware, batch=batch is not None)
            metadata: Any = batch if batch is not None else message
            with anyio.move_on_after(sub.timeout) as scope:
                returned = await call(decoded, metadata if wants_message or wraps else None, publisher)
    finally:
        CURRENT.reset(token)
    if scope.cancelled_caught:
        raise HandlerTimeout(f"the handler did not finish within {sub.timeout:g}s (subscribe(timeout=...))")
    current.check()
    return returned


def _items(sub: Subscription, payload: Any) -> list[bytes]:
    """Each payload's bytes as `publish` encodes it (bytes pass as they are): one, or a batch handler's list."""
    if sub.batch is not None and not (isinstance(payload, (list, tuple)) and payload):
        raise TypeError(f"{sub.name} is a batch handler: call it with a list of one or more payloads")
    items = list(payload) if sub.batch is not None else [payload]
    return [item if isinstance(item, bytes) else encode(item)[0] for item in items]


def find_subscription(
    handler: Callable[..., Any] | Subscription,
    *,
    topic: str | None = None,
    group: str | None = None,
    routers: Sequence[Router] | None = None,
) -> Subscription:
    """The subscription a registered function handles (narrowed by `topic` and `group` when it has several)."""
    if isinstance(handler, Subscription):
        return handler
    found = [
        sub
        for router in (routers if routers is not None else [default_router])
        for sub in router.subscriptions
        if sub.handler.func is handler and topic in (None, sub.topic) and group in (None, sub.group)
    ]
    name = getattr(handler, "__qualname__", repr(handler))
    if not found:
        raise LookupError(
            f"{name} is not a registered handler{f' of {topic!r}' if topic else ''}{f' group {group!r}' if group else ''}: "
            "decorate it with @subscribe(topic, group), or pass the Router it is registered in as routers=[router]"
        )
    if len(found) > 1:
        where = ", ".join(f"({sub.topic!r}, {sub.group!r})" for sub in found)
        raise LookupError(f"{name} handles several subscriptions, {where}: pass topic= and group= to pick one")
    return found[0]


async def call_handler(
    handler: Callable[..., Any] | Subscription,
    payload: Any,
    *,
    topic: str | None = None,
    group: str | None = None,
    routers: Sequence[Router] | None = None,
    bus: Publisher | None = None,
    key: str | None = None,
    properties: Mapping[str, str] | None = None,
    attempt: int = 1,
    redelivery_count: int = 0,
    publish_time: datetime | None = None,
    event_time: datetime | None = None,
    message_id: MessageId | None = None,
    dependencies: Mapping[Provider, Provider] | None = None,
    responses: Mapping[str, Any] | None = None,
) -> CallResult:
    """Run a registered handler on `payload` exactly as the worker would, without a broker.

    >>> result = await call_handler(charge, Order(id="o-1", qty=2), key="o-1")
    >>> assert result.ok and result.published[0].topic.endswith("/invoices")

    The payload is encoded as `publish` would (bytes pass as they are) and decoded by the
    handler's annotation; a `Message` parameter gets metadata built here (override any part:
    `key`, `properties`, `attempt`, ...); an `EventBus` parameter gets `bus`, by default a
    `RecordingPublisher`. Sync handlers run in a thread; the subscription's `timeout` applies; its router's
    middleware runs around the call and its publishes. `dependencies` replace `Depends` providers (``{get_db:
    fake_db}``; app-scoped ones made for this call alone); `responses` answer its `bus.request` calls (see
    `RecordingPublisher`). A batch handler takes a list. Whatever the handler raises is judged as the worker does.
    """
    sub = find_subscription(handler, topic=topic, group=group, routers=routers)
    publisher = bus if bus is not None else RecordingPublisher(responses=responses, middleware=sub.middleware)
    recorded = publisher.published if isinstance(publisher, RecordingPublisher) else []
    before, items = len(recorded), _items(sub, payload)
    full_topic = publisher.topic(sub.topic) if isinstance(publisher, RecordingPublisher) else sub.topic
    message = Message(
        full_topic, key, dict(properties or {}), message_id if message_id is not None else new_message_id(0, 0),
        publish_time or datetime.now(timezone.utc), event_time, redelivery_count, attempt, items[0],
    )

    def result(outcome: CallOutcome, **rest: Any) -> CallResult:
        return CallResult(outcome, message, published=recorded[before:], **rest)

    batch = [dataclasses.replace(message, data=item) for item in items] if sub.batch is not None else None
    try:
        decoded = [sub.handler.decode(item) for item in items] if batch is not None else sub.handler.decode(items[0])
    except DecodeError as exc:
        return result("dead_letter" if sub.dead_letter else "drop", error=exc, reason="undecodable")
    try:
        returned = await _attempt(sub, decoded, message, publisher, dependencies or {}, batch)
        if returned is not None and sub.returns_to is not None:  # as the worker publishes it, before the ack
            await publisher.publish(sub.returns_to, returned, key=key)
    except BaseException as exc:
        if cancelled_by_us(exc):
            raise
        if batch is not None:
            return _batch_result(sub, exc, batch, attempt, recorded[before:])
        return _judged(sub, exc, attempt, result)
    return result("ok", returned=returned, items=tuple(CallResult("ok", m) for m in batch or ()))


def _judged(sub: Subscription, exc: BaseException, attempt: int, result: Callable[..., CallResult]) -> CallResult:
    then = verdict(sub, exc, attempt)
    if then == "retry":
        return result("retry", error=exc, retry_in=backoff(sub, attempt))
    if then == "refused":
        return result("refused", error=exc, reason=then)
    return result("dead_letter" if sub.dead_letter else "drop", error=exc, reason=then)


def _batch_result(
    sub: Subscription, exc: BaseException, batch: list[Message], attempt: int, published: list[Published]
) -> CallResult:
    """Each item judged as the worker judges it: a valid `BatchFailed` fails the items it names, anything else all."""
    problem = exc.problem(len(batch)) if isinstance(exc, BatchFailed) else None
    if isinstance(exc, BatchFailed) and problem is None:
        failures: dict[int, BaseException] = exc.failures
    else:
        failures = dict.fromkeys(range(len(batch)), TypeError(problem) if problem else exc)
    items = tuple(
        _judged(sub, failures[i], attempt, functools.partial(CallResult, message=m, published=published))
        if i in failures else CallResult("ok", m, published=published)
        for i, m in enumerate(batch)
    )
    first = next(item for item in items if not item.ok)
    return dataclasses.replace(first, message=batch[0], items=items)
