"""Request/reply for one bus: a reply topic of its own, subscribed on the first request, and the requests waiting."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from ..broker.client import Consumer, ConsumerClosed, RawMessage, Reader, properties_of
from ..broker.connect import Connection
from ..codec import DecodeError, Decoder, decoder_for
from ..errors import RequestFailed, RequestTimeout
from ..service.returns import CORRELATION_ID, REPLY_ERROR, REPLY_ERROR_TYPE, REPLY_FAILED, REPLY_TOPIC_PREFIX
from ..settings import Settings
from ..topics import REPLY_TO

log = logging.getLogger("eventbus")

#: The name of every bus's subscription on its own reply topic.
REPLY_SUBSCRIPTION = "eventbus-replies"
Publish = Callable[..., Awaitable[Any]]


class Requester:
    """A bus's requests: publishes each with this bus's reply topic and a correlation id, and hands each reply
    to the request waiting for it.

    A topic per bus instance: a requester receives only its own replies (a topic shared by every requester
    would pile every later reply up in a crashed one's subscription). On Apache Pulsar it reads them with a
    Reader, whose non-durable subscription goes with its connection however the process ends; on the embedded
    broker through a subscription removed at close (`Profile.replies_by_reader` says why).
    """

    def __init__(self, connection: Connection, settings: Settings, publish: Publish) -> None:
        self._connection, self._publish, self._settings = connection, publish, settings
        #: Set whenever a request begins or ends to wait (a worker's stop watches `awaited`).
        self.changed = asyncio.Event()
        self.topic = settings.topic(f"{REPLY_TOPIC_PREFIX}{uuid.uuid4().hex[:16]}")
        self._waiting: dict[str, tuple[asyncio.Future[Any], Decoder, str]] = {}
        self._consumer: Consumer | None = None
        self._reader: Reader | None = None
        self._receiving: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        #: Replies that came after their request timed out (or for no request of this bus): dropped.
        self.late = 0

    async def request(
        self, topic: str, payload: Any, *, key: str | bytes | None, timeout: float, response_type: Any,
        properties: Mapping[str, str] | None,
    ) -> Any:
        decode = decoder_for(response_type)  # a type that cannot be decoded fails here, before anything is sent
        await self._subscribe()
        correlation = uuid.uuid4().hex
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = (future, decode, topic)
        self.changed.set()
        try:
            address = {**(properties or {}), REPLY_TO: self.topic, CORRELATION_ID: correlation}
            with anyio.fail_after(timeout):
                # A request without a key gets its correlation id as one: keyless requests spread over the
                # responder's concurrency instead of queueing on one (the empty) key.
                await self._publish(topic, payload, key=correlation if key is None else key, properties=address)
                return await future
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {topic} within {timeout:g}s (request {correlation}); the request is stored and may "
                "still be handled: make the handler idempotent, or raise the timeout"
            ) from None
        finally:
            self._waiting.pop(correlation, None)
            self.changed.set()

    def awaited(self) -> frozenset[str]:
        """The full names of the topics that requests are waiting on a reply from."""
        return frozenset(self._settings.topic(topic) for _, _, topic in self._waiting.values())

    async def _subscribe(self) -> None:
        async with self._lock:
            if self._consumer is not None or self._reader is not None:
                return
            profile = self._connection.profile
            if profile.replies_by_reader:
                self._reader = await self._connection.client.reader(self.topic)
                self._receiving = asyncio.ensure_future(self._read(self._reader))
                return
            self._consumer = await self._connection.client.subscribe(
                self.topic, REPLY_SUBSCRIPTION, subscription_type="exclusive", initial_position="earliest",
                receiver_queue_size=1000, consumer_name=f"{REPLY_SUBSCRIPTION}-{os.getpid()}",
                batch_index_ack=profile.batch_index_ack,
            )
            self._receiving = asyncio.ensure_future(self._receive(self._consumer))

    async def _receive(self, consumer: Consumer) -> None:
        """Answer each reply as it comes: on the client's callback, then what else its queue holds (no thread)."""
        while True:
            try:
                first = await consumer.receive_later()
                batch = [first, *consumer.receive(255, 0)]
            except ConsumerClosed:
                return
            for raw in batch:
                self._answer(raw)
            consumer.acknowledge(collections.deque(batch))

    async def _read(self, reader: Reader) -> None:
        while True:
            try:
                raw = await reader.receive()
            except ConsumerClosed:
                return
            self._answer(raw)

    def _answer(self, raw: RawMessage) -> None:
        properties = properties_of(raw) or {}
        waiting = self._waiting.get(properties.get(CORRELATION_ID, ""))
        if waiting is None or waiting[0].done():
            self.late += 1
            log.info("dropped a reply for no waiting request (it came after its timeout, or to another bus)")
            return
        future, decode, topic = waiting
        failed = properties.get(REPLY_FAILED)
        if failed is not None:
            future.set_exception(
                RequestFailed(topic, failed, properties.get(REPLY_ERROR_TYPE, ""), properties.get(REPLY_ERROR, ""))
            )
            return
        try:
            future.set_result(decode(raw.data()))
        except DecodeError as exc:
            future.set_exception(exc)

    async def close(self) -> None:
        """Fail the requests still waiting, stop receiving, remove the subscription."""
        for future, _, _ in self._waiting.values():
            if not future.done():
                future.set_exception(RequestTimeout("the bus closed before the reply came"))
        if self._receiving is not None:
            self._receiving.cancel()  # it waits for a reply that may never come
            await asyncio.wait([self._receiving])  # ended: a cancellation of close() itself still goes through
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                await consumer.unsubscribe()
            except Exception as exc:
                log.warning("removing the reply subscription of %s: %s", self.topic, exc)
