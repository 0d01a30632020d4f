"""Producers: one per topic, created once and reused; sends confirmed through callbacks."""

from __future__ import annotations

import asyncio
import collections
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
_NEVER_MS = 24 * 3600 * 1000
_GROUP_BYTES_MAX = 1024 * 1024
#: Bytes a batch spends per message and per property besides their contents (an upper bound).
_FRAMING = 32


def build_message(
    data: bytes,
    content_type: str | None,
    *,
    key: str | bytes | None = None,
    properties: Mapping[str, str] | None = None,
    deliver_after: timedelta | float | None = None,
    event_time: datetime | int | None = None,
    sequence_id: int | None = None,
) -> tuple[_pulsar.Message, int]:
    """Build a client message, checking every argument before anything is sent.

    Returns the message and about how many bytes it takes in a batch: payload,
    key, properties and their framing, which is what the broker's size limit counts.
    """
    builder = _pulsar.MessageBuilder()
    builder.content(data)
    size = len(data) + _FRAMING
    if content_type is not None:
        builder.property(CONTENT_TYPE, content_type)
        size += len(CONTENT_TYPE) + len(content_type)
    if properties:
        for name, value in properties.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(
                    f"message property {name!r}={value!r} is not str=str: convert property values to strings"
                )
            try:
                builder.property(name, value)
            except TypeError:  # pybind11's words for a str that is not valid UTF-8
                raise TypeError(
                    f"message property {name!r}={value!r} is not valid UTF-8 (a lone surrogate?): "
                    "encode it, e.g. value.encode('utf-8', 'backslashreplace').decode()"
                ) from None
            size += len(name) + len(value) + _FRAMING
    if key is not None:
        if not isinstance(key, (str, bytes)):
            raise TypeError(f"message key must be a str, not {type(key).__name__}")
        try:
            builder.partition_key(key)
        except TypeError:
            raise TypeError(f"message key {key!r} is not valid UTF-8 (a lone surrogate?): encode it first") from None
        size += len(key)
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
    return builder.build(), size


class _Slots:
    """A counting semaphore whose free path is one comparison (asyncio's builds a generator)."""

    def __init__(self, count: int) -> None:
        self.free = self._count = count
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: asyncio.Future[None] | None = None

    async def acquire(self) -> None:
        while self.free <= 0:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the turn on
                else:
                    self._waiters.remove(waiter)
                    self._check_idle()
                raise
        self.free -= 1

    def release(self, count: int = 1) -> None:
        self.free += count
        if self._waiters:
            self._wake()
        elif self._idle is not None:
            self._check_idle()

    def _check_idle(self) -> None:
        idle = self._idle
        if idle is not None and self.free >= self._count and not self._waiters and not idle.done():
            idle.set_result(None)

    async def drained(self) -> None:
        """Wait until every slot is free and nobody waits for one."""
        while self.free < self._count or self._waiters:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def _wake(self) -> None:
        for _ in range(min(self.free, len(self._waiters))):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class TopicProducer:
    """A producer with at most `max_pending` unconfirmed messages in flight.

    A Python callback per message is the wall: the client's I/O thread must take
    the GIL for each one. So on a non-partitioned topic the producer sends what
    was published in one event-loop turn as a *group*, and asks for a receipt
    only for the last message of each key in it; that receipt speaks for the
    key's other messages of the group, because they travel in the same batch:

    - the client batches by key (KeyBased), and a group never fills its batch
      container (fewer than `batching_max_messages` messages and
      `batching_max_bytes` bytes) nor waits long enough for its timer, so the
      only flush is the one after the group: each key's messages of the group
      become exactly one batch, and the client completes a batch's messages
      together, with one result (ok, timeout, checksum error, too big, closed);
    - the failures the client reports at send time (closed, fenced) hold for
      every later send too, so they reach the key's last message as well.

    Messages the client does not batch (`deliver_after`) and partitioned topics
    get a receipt each: the client picks a partition per message, and its
    partitioned producer ignores a flush asked for while an earlier one waits,
    which would leave a group in its buffer (even with one partition).
    """

    def __init__(
        self,
        topic: str,
        producer: pulsar.asyncio.Producer,
        bridge: LoopBridge,
        max_pending: int,
        *,
        group_messages: int = 0,
        group_bytes: int = 0,
        group_delay: float = 0.0,
    ) -> None:
        self.topic = topic
        self.wrapper = producer
        self._producer: _pulsar.Producer = producer._producer
        self._bridge = bridge
        # The client's own queue would reject past its limit; waiting here instead
        # turns a burst into backpressure rather than errors.
        self._slots = _Slots(max_pending)
        self._group_messages = group_messages  # 0: a receipt per message
        self._group_bytes = group_bytes
        self._group_delay = group_delay
        self._queue: list[tuple[_pulsar.Message, str | bytes, int, asyncio.Future[MessageId]]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.closing = False

    async def send(
        self, message: _pulsar.Message, key: str | bytes | None = None, size: int = 0, *, batchable: bool = True
    ) -> MessageId:
        """Send and wait until the broker confirmed the message.

        `key` and `size` must be the message's partition key and size (from `build_message`).
        """
        if not self.reserve_nowait():
            await self.reserve()
        return await self.enqueue(message, key, size, batchable)

    async def submit(
        self, message: _pulsar.Message, key: str | bytes | None = None, size: int = 0, *, batchable: bool = True
    ) -> asyncio.Future[MessageId]:
        """Send; the returned future resolves when the broker confirmed the message."""
        await self.reserve()
        return self.enqueue(message, key, size, batchable)

    def reserve_nowait(self) -> bool:
        """Take a pending slot if one is free; `enqueue` then uses it."""
        if self.closing:
            raise self.closed_error()
        slots = self._slots
        if slots.free > 0:
            slots.free -= 1
            return True
        return False

    async def reserve(self) -> None:
        """Wait for a pending slot; a publish waiting when `close()` begins is still sent."""
        if self.closing:
            raise self.closed_error()
        await self._slots.acquire()

    def closed_error(self) -> PublishError:
        return PublishError(self.topic, "BusClosed", maybe_stored=False)

    def enqueue(
        self, message: _pulsar.Message, key: str | bytes | None, size: int, batchable: bool
    ) -> asyncio.Future[MessageId]:
        """Send on a reserved slot; the future resolves when the broker confirmed the message."""
        loop = self._bridge.loop
        future = loop.create_future()
        if not (self._group_messages and batchable):
            try:
                self._producer.send_async(message, functools.partial(self._bridge.call, self._done, [future]))
            except BaseException:
                self._slots.release()
                raise
            return future
        queue = self._queue
        # The client batches by the key's bytes: a bytes key and its str spelling are one lane.
        if key.__class__ is bytes:
            key = key.decode("utf-8", "surrogateescape")  # type: ignore[union-attr]
        queue.append((message, key or "", size, future))
        if len(queue) >= self._group_messages:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_soon(self._dispatch)
        elif self._timer is None:
            self._timer = (
                loop.call_later(self._group_delay, self._dispatch) if self._group_delay else loop.call_soon(self._dispatch)
            )
        return future

    def _dispatch(self) -> None:
        self._timer = None
        queue, self._queue = self._queue, []
        send = self._producer.send_async
        call = self._bridge.call
        done = self._done
        limit, budget = self._group_messages, self._group_bytes
        start, count = 0, len(queue)
        while start < count:
            # The group: what the client's batch container takes without flushing it.
            end, total = start + 1, queue[start][2]
            while end < count and end - start < limit and total + queue[end][2] < budget:
                total += queue[end][2]
                end += 1
            last = {entry[1]: i for i, entry in enumerate(queue[start:end], start)}
            lanes: dict[str, list[asyncio.Future[MessageId]]] = {}
            i = start
            try:
                for i in range(start, end):
                    message, key, _, future = queue[i]
                    lane = lanes.get(key)
                    if lane is None:
                        lane = lanes[key] = []
                    lane.append(future)
                    send(message, functools.partial(call, done, lane) if last[key] == i else None)
            except Exception as exc:
                # No receipt will come for the lanes whose last message was not sent.
                orphans = [f for k, lane in lanes.items() if last[k] >= i for f in lane]
                self._fail([*orphans, *(entry[3] for entry in queue[i + 1 :])], exc)
                return
            finally:
                self._producer.flush_async(_flushed)
            start = end

    def _fail(self, futures: list[asyncio.Future[MessageId]], exc: Exception) -> None:
        self._slots.release(len(futures))
        for future in futures:
            if not future.done():
                # Earlier messages of a lane were handed to the client: stored or not, nobody can tell.
                future.set_exception(PublishError(self.topic, type(exc).__name__, str(exc), maybe_stored=True))

    def _done(self, lane: list[asyncio.Future[MessageId]], result: _pulsar.Result, message_id: MessageId) -> None:
        """The receipt of a lane's last message, for every message of the lane."""
        self._slots.release(len(lane))
        if result == _OK:
            if len(lane) == 1:
                if not lane[0].done():
                    lane[0].set_result(message_id)
                return
            # A batch's messages share its entry; each is told apart by its index.
            partition, ledger, entry = message_id.partition(), message_id.ledger_id(), message_id.entry_id()
            first = message_id.batch_index() - len(lane) + 1
            if first != 0:
                # The lane is not one whole batch (a client that batches otherwise):
                # the receipt names only its last message; the others' ids are unknown.
                *rest, last = lane
                if not last.done():
                    last.set_result(message_id)
                error = PublishError(self.topic, "UnknownId", f"receipt {message_id} does not cover {len(lane)} messages")
                for future in rest:
                    if not future.done():
                        future.set_exception(error)
                return
            for index, future in enumerate(lane):
                if not future.done():
                    future.set_result(_pulsar.MessageId(partition, ledger, entry, index))
        else:
            for future in lane:
                if not future.done():
                    future.set_exception(PublishError(self.topic, result))

    async def close(self) -> None:
        """Refuse new publishes, settle every accepted one with its true outcome, then close."""
        self.closing = True
        try:
            await self._slots.drained()
            await self.wrapper.flush()
        finally:
            await self.wrapper.close()


def _flushed(result: _pulsar.Result) -> None:
    # Each message's outcome arrives through its lane's receipt; never raise here.
    pass


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
    # A partitioned topic, even of one partition, names its partitions ("...-partition-0").
    grouped = await client.get_topic_partitions(topic) == [topic] and options["batching_enabled"]
    if grouped:
        # The bus flushes every group itself; the client's timer must never cut one.
        options["batching_max_publish_delay_ms"] = _NEVER_MS
    producer = await client.create_producer(topic, **options)
    if not grouped:
        return TopicProducer(topic, producer, bridge, settings.producer_max_pending_messages)
    return TopicProducer(
        topic, producer, bridge, settings.producer_max_pending_messages,
        group_messages=min(options["batching_max_messages"], settings.producer_max_pending_messages),
        # Below the broker's 5 MB message limit too: a batch that big would fail whole.
        group_bytes=min(options["batching_max_allowed_size_in_bytes"], _GROUP_BYTES_MAX),
        group_delay=settings.producer_batching_max_delay_ms / 1000,
    )
