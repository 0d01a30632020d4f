"""Producers: one per topic, created once and reused; sends confirmed through callbacks."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import _pulsar
import pulsar
import pulsar.asyncio

from .bridge import LoopBridge
from .codec import CONTENT_TYPE
from .errors import PublishError
from .message import MessageId
from .settings import Settings

_COMPRESSION = {
    "none": pulsar.CompressionType.NONE,
    "lz4": pulsar.CompressionType.LZ4,
    "zlib": pulsar.CompressionType.ZLib,
    "zstd": pulsar.CompressionType.ZSTD,
    "snappy": pulsar.CompressionType.SNAPPY,
}
_OK = _pulsar.Result.Ok


def build_message(
    data: bytes,
    content_type: str | None,
    *,
    key: str | None = None,
    properties: Mapping[str, str] | None = None,
    deliver_after: timedelta | float | None = None,
    event_time: datetime | int | None = None,
    sequence_id: int | None = None,
) -> _pulsar.Message:
    """Build a client message, checking every argument before anything is sent."""
    builder = _pulsar.MessageBuilder()
    builder.content(data)
    if content_type is not None:
        builder.property(CONTENT_TYPE, content_type)
    if properties:
        for name, value in properties.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(
                    f"message property {name!r}={value!r} is not str=str: convert property values to strings"
                )
            builder.property(name, value)
    if key is not None:
        if not isinstance(key, str):
            raise TypeError(f"message key must be a str, not {type(key).__name__}")
        builder.partition_key(key)
    if deliver_after is not None:
        if not isinstance(deliver_after, timedelta):
            deliver_after = timedelta(seconds=deliver_after)
        builder.deliver_after(deliver_after)
    if event_time is not None:
        if isinstance(event_time, datetime):
            event_time = int(event_time.timestamp() * 1000)
        builder.event_timestamp(event_time)
    if sequence_id is not None:
        builder.sequence_id(sequence_id)
    return builder.build()


class TopicProducer:
    """A producer with at most `max_pending` unconfirmed messages in flight."""

    def __init__(self, topic: str, producer: pulsar.asyncio.Producer, bridge: LoopBridge, max_pending: int) -> None:
        self.topic = topic
        self.wrapper = producer
        self._producer: _pulsar.Producer = producer._producer
        self._bridge = bridge
        # The client's own queue would reject past its limit; waiting here instead
        # turns a burst into backpressure rather than errors.
        self._slots = asyncio.Semaphore(max_pending)

    async def send(self, message: _pulsar.Message) -> MessageId:
        """Send and wait until the broker confirmed the message."""
        return await (await self.submit(message))

    async def submit(self, message: _pulsar.Message) -> asyncio.Future[MessageId]:
        """Send; the returned future resolves when the broker confirmed the message."""
        await self._slots.acquire()
        future = asyncio.get_running_loop().create_future()
        try:
            self._producer.send_async(message, functools.partial(self._bridge.call, self._done, future))
        except BaseException:
            self._slots.release()
            raise
        return future

    def _done(self, future: asyncio.Future[MessageId], result: _pulsar.Result, message_id: MessageId) -> None:
        self._slots.release()
        if future.done():
            return
        if result == _OK:
            future.set_result(message_id)
        else:
            future.set_exception(PublishError(self.topic, result))

    async def close(self) -> None:
        try:
            await self.wrapper.flush()
        finally:
            await self.wrapper.close()


async def create_producer(
    client: pulsar.asyncio.Client, topic: str, settings: Settings, bridge: LoopBridge, **overrides: Any
) -> TopicProducer:
    options: dict[str, Any] = dict(
        batching_enabled=True,
        # Key-based batches keep one key per batch, which key_shared consumers need.
        batching_type=pulsar.BatchingType.KeyBased,
        batching_max_messages=settings.producer_batching_max_messages,
        batching_max_allowed_size_in_bytes=settings.producer_batching_max_bytes,
        batching_max_publish_delay_ms=settings.producer_batching_max_delay_ms,
        compression_type=_COMPRESSION[settings.producer_compression],
        send_timeout_millis=settings.producer_send_timeout_ms,
        max_pending_messages=settings.producer_max_pending_messages,
        block_if_queue_full=False,
    )
    if settings.producer_name:
        options["producer_name"] = settings.producer_name
    options.update(overrides)
    producer = await client.create_producer(topic, **options)
    return TopicProducer(topic, producer, bridge, settings.producer_max_pending_messages)
