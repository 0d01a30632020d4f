"""Sending for a bus, chosen once at start: plain, or instrumented (declared payload types, tracing, the observer)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

from ..broker.client import MessageId, build_message, id_text
from ..codec import encode
from ..context import CURRENT, Caller, watch_unawaited
from ..errors import PublishBatchError
from ..observing.events import Observer, Published
from ..observing.tracing import Tracing
from ..registry import Publication, Router
from ..service.handler import BatchOptions, PublishOptions
from ..service.middleware import Outgoing, PublishNext, around_publish
from ..settings import Settings
from .producers import Producers


class Publishing:
    """Encode, build, hand to the topic's producer, await the receipt."""

    def __init__(self, producers: Producers) -> None:
        self._producers = producers

    async def publish(self, topic: str, payload: Any, options: PublishOptions, _caller: Caller) -> MessageId:
        """One publish. `_caller` is read when the coroutine is never awaited (context.watch_unawaited)."""
        data, content_type = encode(payload)
        current = CURRENT.get()
        if current is not None and current.outputs is not None:  # an effectively-once handler's output
            sent: MessageId = await current.outputs.publish(topic, data, content_type, options)
            return sent
        message, size = build_message(data, content_type, **options)
        producers = self._producers
        producer = producers.ready.get(topic) or await producers.get(topic)
        if not producer.reserve_nowait():  # no coroutine of its own: this runs per message
            await producer.reserve()
        return await producer.enqueue(message, options.get("key"), size, options.get("deliver_after") is None)

    async def publish_batch(self, topic: str, payloads: Iterable[Any], options: BatchOptions, _caller: Caller) -> list[MessageId]:
        """Every payload encoded before the first is sent; `PublishBatchError` names each failure by index."""
        return await self._many(topic, _encoded(payloads), options)

    async def _many(self, topic: str, encoded: list[tuple[Any, bytes, str | None]], options: BatchOptions) -> list[MessageId]:
        current = CURRENT.get()
        if current is not None and current.outputs is not None:
            return await _once_each(current.outputs, topic, encoded, options)
        messages = [build_message(data, content_type, **options) for _, data, content_type in encoded]
        producer = await self._producers.get(topic)
        key, batchable = options.get("key"), options.get("deliver_after") is None
        futures: list[asyncio.Future[MessageId] | None] = []
        failures: dict[int, BaseException] = {}
        for index, (message, size) in enumerate(messages):
            try:
                futures.append(await producer.submit(message, key, size, batchable=batchable))
            except Exception as exc:
                failures[index] = exc
                futures.append(None)
        ids: list[Any] = []
        for index, future in enumerate(futures):
            try:
                ids.append(await future if future is not None else None)
            except Exception as exc:
                failures[index] = exc
                ids.append(None)
        if failures:
            raise PublishBatchError(producer.topic, failures, ids)
        return ids


class Instrumented(Publishing):
    """`Publishing` with declared payload types checked, a PRODUCER span per publish, and the observer told."""

    def __init__(
        self, producers: Producers, settings: Settings, publications: Mapping[str, Publication],
        tracing: Tracing | None, observer: Observer | None,
    ) -> None:
        super().__init__(producers)
        # A topic's full name, resolved once: checking the name each time cost a declared topic's publishes
        # a quarter of their rate (bench, 23k -> 17k msg/s).
        self._full = functools.lru_cache(maxsize=4096)(settings.topic)
        self._publications = publications
        self._tracing = tracing
        self._observer = observer

    async def publish(self, topic: str, payload: Any, options: PublishOptions, _caller: Caller) -> MessageId:
        full = self._full(topic)
        publication = self._publications.get(full)
        if publication is not None:
            publication.check(payload)
        if self._tracing is None and self._observer is None:  # declared types alone: checked, then sent plainly
            return await super().publish(topic, payload, options, _caller)
        data, content_type = encode(payload)
        with self._span(full, options.get("properties")) as (span, traced):
            sent: PublishOptions = {**options, "properties": traced}
            current = CURRENT.get()
            message_id: MessageId
            if current is not None and current.outputs is not None:
                message_id = await current.outputs.publish(topic, data, content_type, sent)
            else:
                message, size = build_message(data, content_type, **sent)
                producers = self._producers
                producer = producers.ready.get(topic) or await producers.get(topic)
                message_id = await producer.send(
                    message, options.get("key"), size, batchable=options.get("deliver_after") is None
                )
            if span is not None:
                span.set_attribute("messaging.message.id", id_text(message_id))
        if self._observer is not None:
            self._observer.record(Published(full, options.get("key"), payload, dict(traced or {}), data, message_id))
        return message_id

    async def publish_batch(self, topic: str, payloads: Iterable[Any], options: BatchOptions, _caller: Caller) -> list[MessageId]:
        encoded = _encoded(payloads)
        full = self._full(topic)
        publication = self._publications.get(full)
        if publication is not None:
            for index, (payload, _, _) in enumerate(encoded):
                try:
                    publication.check(payload)
                except TypeError as exc:
                    raise TypeError(f"payload #{index}: {exc}") from None
        count = {"messaging.batch.message_count": len(encoded)}
        with self._span(full, options.get("properties"), **count) as (_, traced):
            sent: BatchOptions = {**options, "properties": traced}
            ids = await self._many(topic, encoded, sent)
        if self._observer is not None:
            for (payload, data, _), message_id in zip(encoded, ids):
                self._observer.record(Published(full, options.get("key"), payload, dict(traced or {}), data, message_id))
        return ids

    def _span(
        self, topic: str, properties: Mapping[str, str] | None, **attributes: Any
    ) -> AbstractContextManager[tuple[Any, Mapping[str, str] | None]]:
        """A PRODUCER span and the properties carrying its context; without tracing, none and the properties."""
        if self._tracing is None:
            return nullcontext((None, properties))
        return self._tracing.send(topic, properties, **attributes)


class Intercepted(Publishing):
    """Sending through the publish sides of middleware (the first outermost), then the plain or instrumented way."""

    def __init__(self, inner: Publishing, one: PublishNext, batch: PublishNext) -> None:
        super().__init__(inner._producers)
        self._one, self._batch = one, batch

    @classmethod
    def around(cls, inner: Publishing, middleware: Sequence[object]) -> Publishing:
        """`inner` inside the middleware's publish sides, or `inner` itself when none has one."""

        def one(out: Outgoing) -> Awaitable[MessageId]:
            return inner.publish(out.topic, out.payload, cast(PublishOptions, out.options()), _NOWHERE)

        def batch(out: Outgoing) -> Awaitable[list[MessageId]]:
            return inner.publish_batch(out.topic, out.payload, cast(BatchOptions, out.options()), _NOWHERE)

        chained, chained_batch = around_publish(one, middleware), around_publish(batch, middleware)
        return inner if chained is None or chained_batch is None else cls(inner, chained, chained_batch)

    async def publish(self, topic: str, payload: Any, options: PublishOptions, _caller: Caller) -> MessageId:
        message_id: MessageId = await self._one(_outgoing(topic, payload, options, batch=False))
        return message_id

    async def publish_batch(self, topic: str, payloads: Iterable[Any], options: BatchOptions, _caller: Caller) -> list[MessageId]:
        ids: list[MessageId] = await self._batch(_outgoing(topic, list(payloads), options, batch=True))
        return ids


def sending_for(
    producers: Producers, settings: Settings, routers: Sequence[Router], tracing: Tracing | None,
    observer: Observer | None, middleware: Sequence[object],
) -> Publishing:
    """A bus's sending, chosen once at start: plain; instrumented for declared payload types, tracing or an
    observer; inside the publish sides of the bus's then the routers' middleware."""
    for kind in (Publishing, Instrumented, Intercepted):
        watch_unawaited(kind.publish.__code__)
        watch_unawaited(kind.publish_batch.__code__)
    publications = {settings.topic(p.topic): p for router in routers for p in router.publications}
    sending = Publishing(producers)
    if tracing or observer or publications:
        sending = Instrumented(producers, settings, publications, tracing, observer)
    return Intercepted.around(sending, (*middleware, *(item for router in routers for item in router.middleware)))


#: The caller of a publish made by the bus itself (it is awaited: nobody reads it).
_NOWHERE: Caller = ("", 0, "")


def _outgoing(topic: str, payload: Any, options: BatchOptions | PublishOptions, *, batch: bool) -> Outgoing:
    sequence_id = cast(PublishOptions, options).get("sequence_id")
    return Outgoing(
        topic, payload, options.get("key"), dict(options.get("properties") or {}), options.get("deliver_after"),
        options.get("event_time"), sequence_id, batch,
    )


async def _once_each(
    outputs: Any, topic: str, encoded: list[tuple[Any, bytes, str | None]], options: BatchOptions
) -> list[MessageId]:
    """A batch of effectively-once outputs: each in turn, numbered in order; failures named by index as any batch's."""
    ids: list[Any] = []
    failures: dict[int, BaseException] = {}
    for index, (_, data, content_type) in enumerate(encoded):
        try:
            ids.append(await outputs.publish(topic, data, content_type, options))
        except Exception as exc:
            failures[index] = exc
            ids.append(None)
    if failures:
        raise PublishBatchError(topic, failures, ids)
    return ids


def _encoded(payloads: Iterable[Any]) -> list[tuple[Any, bytes, str | None]]:
    out: list[tuple[Any, bytes, str | None]] = []
    for index, payload in enumerate(payloads):
        try:
            data, content_type = encode(payload)
        except TypeError as exc:
            raise TypeError(f"payload #{index}: {exc}") from None
        out.append((payload, data, content_type))
    return out

