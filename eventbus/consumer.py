"""Running one subscription: receive, dispatch by key, retry, dead-letter, acknowledge."""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import os
import random
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import _pulsar
import anyio
import pulsar

from .codec import DecodeError
from .errors import PULSAR_ERRORS, SubscriptionFailed
from .message import Message, from_millis
from .registry import Subscription

if TYPE_CHECKING:
    from .bus import EventBus

log = logging.getLogger("eventbus")

_TYPES = {
    "key_shared": pulsar.ConsumerType.KeyShared,
    "shared": pulsar.ConsumerType.Shared,
    "failover": pulsar.ConsumerType.Failover,
    "exclusive": pulsar.ConsumerType.Exclusive,
}
_POSITIONS = {"latest": pulsar.InitialPosition.Latest, "earliest": pulsar.InitialPosition.Earliest}
_STOP = object()
#: How long the receive thread blocks before it looks at the stop flag again.
_POLL_MS = 100
#: Messages the receive thread hands the loop per wake-up at most.
_HANDOFF = 256
_ERROR_TEXT_MAX = 2000
#: How often a standby process looks whether the subscription's lease is free.
_LEASE_POLL = 0.25
#: How often a standby member asks Apache Pulsar for the exclusive subscription: first, and at most.
_STANDBY_POLL = (0.5, 5.0)
#: Acknowledged ids remembered to drop redelivered copies (about 100 bytes each).
_REMEMBER_ACKED = 100_000


def _ignore(result: _pulsar.Result) -> None:
    # An acknowledgement that did not reach the broker means a redelivery: at
    # least once still holds. Never raise here: the client would abort.
    pass


class SubscriptionRunner:
    """Consumes one (topic, group) for the life of `EventBus.run()`."""

    def __init__(self, bus: EventBus, sub: Subscription, topic: str) -> None:
        self.bus = bus
        self.sub = sub
        self.topic = topic
        self.dlq_topic = sub.dead_letter_topic(topic)
        settings = bus.settings
        self.max_in_flight = settings.consumer_max_in_flight
        self._stopping = asyncio.Event()
        self._thread_stop = False
        self._consumer: _pulsar.Consumer | None = None
        self._wrapper: pulsar.asyncio.Consumer | None = None
        # A lane is a key (ordered subscriptions) or a single message (shared);
        # a lane is in _lanes while it is queued in _ready or being handled.
        self._lanes: dict[object, collections.deque[tuple[_pulsar.Message, Ident]]] = {}
        self._ready: asyncio.Queue[object] = asyncio.Queue()
        self._unique = itertools.count()
        # Written by one thread each, so their difference is safe to read anywhere.
        self._received = 0
        self._finished = 0
        self._room = threading.Event()
        self._acks: collections.deque[_pulsar.Message] = collections.deque()
        # Ids being handled, and ids acknowledged lately: a broker may hand a
        # message over again (after a reconnect, or pulsar-lite's single-active
        # dispatchers, which replay), and a second copy must not run twice.
        self._active: set[tuple[int, int, int, int]] = set()
        self._acked: set[tuple[int, int, int, int]] = set()
        self._acked_order: collections.deque[tuple[int, int, int, int]] = collections.deque()
        self.handled = 0
        self.duplicates = 0
        #: Dead-letter publishes that failed and are being retried (the message's key waits meanwhile).
        self.dead_letter_failures = 0
        #: What killed the runner, if something did.
        self.failure: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._timed_out: set[asyncio.Task[Any]] = set()
        broker = bus._broker
        self._lease = broker.lease(topic, sub.group) if broker is not None else None

    @property
    def in_flight(self) -> int:
        return self._received - self._finished

    @property
    def kind(self) -> str:
        """The subscription type asked of the broker."""
        if self._lease is not None:
            # The embedded broker's single-active dispatchers (failover, exclusive)
            # hand the same messages over again and again, and its key_shared one
            # strands a key's messages when a consumer leaves. With one consumer
            # at a time (SubscriptionLease), shared delivers in order, once.
            return "shared"
        if self.sub.subscription == "key_shared" and self.bus.lite_broker:
            return "failover"  # pulsar-lite reached by URL: no lease, so one active consumer
        if self.sub.subscription == "failover" and not self.bus.lite_broker:
            # Pulsar's failover moves the active role without telling the consumer
            # that lost it (pulsar-client 3.13 takes no consumer-event listener), so
            # both would handle a key at once. Exclusive: one member consumes, the
            # others stand by and subscribe when it has drained and left.
            return "exclusive"
        return self.sub.subscription

    @property
    def standing_by(self) -> bool:
        """True while another process consumes this subscription of the embedded broker."""
        return self._lease is not None and not self._lease.held

    def may_consume(self) -> bool:
        """False while another process consumes this subscription of the embedded broker."""
        return self._lease is None or self._lease.acquire()

    async def _lease_until_stopped(self) -> bool:
        if self.may_consume():
            return True
        log.info(
            "standby: another process consumes %s group=%s on the embedded broker; taking over when it leaves",
            self.topic, self.sub.group,
        )
        while not await self._sleep_unless_stopped(_LEASE_POLL):
            if self.may_consume():
                log.info("taking over %s group=%s", self.topic, self.sub.group)
                return True
        return False

    async def _subscribe_until_stopped(self) -> bool:
        delay = 1.0
        standby = False
        poll = _STANDBY_POLL[0]
        while not self._stopping.is_set():
            try:
                await self.subscribe()
                if standby:
                    log.info("taking over %s group=%s", self.topic, self.sub.group)
                return True
            except PULSAR_ERRORS as exc:
                if "ConsumerBusy" in str(exc):
                    # Another member holds the exclusive subscription: take over as soon as it leaves.
                    if not standby:
                        log.info(
                            "standby: another member consumes %s group=%s (%s); taking over when it leaves",
                            self.topic, self.sub.group, self.kind,
                        )
                        poll = _STANDBY_POLL[0]
                    standby = True
                    if await self._sleep_unless_stopped(poll):
                        break
                    # Each refused subscribe is a ConsumerBusy line in the client's log: ask less often.
                    poll = min(poll * 1.5, _STANDBY_POLL[1])
                    continue
                log.warning("still cannot subscribe %s group=%s (%s); next try in %.0fs", self.topic, self.sub.group, exc, delay)
            if await self._sleep_unless_stopped(delay):
                break
            delay = min(delay * 2, 30.0)
        return False

    async def subscribe(self) -> None:
        settings = self.bus.settings
        self._wrapper = await self.bus._client.subscribe(
            self.topic,
            self.sub.group,
            consumer_type=_TYPES[self.kind],
            initial_position=_POSITIONS[self.sub.initial_position],
            receiver_queue_size=settings.consumer_receiver_queue_size,
            consumer_name=f"{socket.gethostname()}-{os.getpid()}-{self.sub.group}",
            # No batch-index acks: a broker without them (pulsar-lite, and Pulsar
            # unless acknowledgmentAtBatchIndexLevelEnabled) takes a partial
            # batch ack for the whole batch, which loses its other messages.
        )
        self._consumer = self._wrapper._consumer
        sub = self.sub
        kind = sub.subscription if self.kind == sub.subscription else f"{self.kind} (on {self.bus.server_version})"
        log.info(
            "subscribed %s group=%s type=%s concurrency=%d -> %s", self.topic, sub.group, kind, sub.concurrency, sub.name
        )

    async def run(self) -> None:
        """Consume until `stop()`; then finish in-flight handlers and close the consumer."""
        if self._consumer is None:
            if not await self._lease_until_stopped() or not await self._subscribe_until_stopped():
                self._release()
                return
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._guard, self._receive)
                for _ in range(self.sub.concurrency):
                    tg.start_soon(self._guard, self._worker)
                if self.sub.timeout:
                    tg.start_soon(self._guard, self._watchdog)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()
        if self.failure is not None:
            raise SubscriptionFailed(
                f"subscription {self.sub.group!r} on {self.topic} stopped: {_text(self.failure)}"
            ) from self.failure

    async def _guard(self, part: Callable[[], Awaitable[None]]) -> None:
        """Run a part of the runner; one that dies stops the runner, loudly, so the worker exits non-zero."""
        try:
            await part()
        except BaseException as exc:
            if _cancelled_by_us(exc):
                raise
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log.critical(
                "subscription %s group=%s died; stopping the worker: %s", self.topic, self.sub.group, _text(exc),
                exc_info=exc,
            )
        self.stop()

    def stop(self) -> None:
        """Stop taking messages; handlers already running finish and are acknowledged."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread_stop = True
        self._room.set()
        # Queued but not started: left unacknowledged, so the broker redelivers them.
        while not self._ready.empty():
            self._ready.get_nowait()
        for _ in range(self.sub.concurrency):
            self._ready.put_nowait(_STOP)

    async def _close(self) -> None:
        if self._consumer is not None:
            self._send_acks(self._consumer)  # what came after the receive thread ended
        if self._wrapper is not None:
            try:
                await self._wrapper.close()
            except Exception as exc:
                log.warning("closing consumer %s/%s: %s", self.topic, self.sub.group, exc)
            # Drop every client object now: destroyed later, during interpreter
            # teardown, they can abort the process from the client's C++ side.
            self._wrapper = self._consumer = None
            self._lanes.clear()
        self._release()

    def _release(self) -> None:
        # Only once the consumer is closed: the next holder must find it gone.
        if self._lease is not None:
            self._lease.release()

    # -- receiving (a thread of its own: the client's receive blocks) -----------

    async def _receive(self) -> None:
        await anyio.to_thread.run_sync(self._receive_thread, limiter=anyio.CapacityLimiter(1))

    def _receive_thread(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        call = self.bus._bridge.call
        limit = self.max_in_flight
        room = self._room
        while not self._thread_stop:
            self._send_acks(consumer)
            if self._received - self._finished >= limit:
                room.clear()
                if self._received - self._finished >= limit:
                    room.wait(_POLL_MS / 1000)
                continue
            try:
                batch = [consumer.receive(_POLL_MS)]
            except _pulsar.Timeout:
                continue
            except _pulsar.AlreadyClosed:
                return
            # Hand over whatever else is already here in the same wake-up.
            take = min(limit - (self._received - self._finished), _HANDOFF) - 1
            while take > 0:
                try:
                    batch.append(consumer.receive(0))
                except _pulsar.Timeout:
                    break
                take -= 1
            self._received += len(batch)
            call(self._enqueue, batch)

    def _enqueue(self, batch: list[_pulsar.Message]) -> None:
        try:
            self._dispatch(batch)
        except BaseException as exc:  # a bug: the batch's count can no longer be trusted
            self._die(exc)

    def _dispatch(self, batch: list[_pulsar.Message]) -> None:
        if self._stopping.is_set():
            return
        ordered = self.sub.ordered
        lanes = self._lanes
        active = self._active
        for message in batch:
            ident = _ident(message)
            if ident in active or ident in self._acked:
                self.duplicates += 1
                self._finished += 1
                if ident not in active:
                    self._ack_again(message)
                continue
            active.add(ident)
            # A key that is not UTF-8 (any producer may send one) is its lane as bytes.
            lane: object = key_of(message) if ordered else next(self._unique)
            queue = lanes.get(lane)
            if queue is None:
                lanes[lane] = collections.deque(((message, ident),))
                self._ready.put_nowait(lane)
            else:
                queue.append((message, ident))

    # -- handling ----------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            lane = await self._ready.get()
            if lane is _STOP:
                return
            queue = self._lanes[lane]
            message, ident = queue.popleft()
            try:
                await self._handle(message, ident)
            finally:
                self._active.discard(ident)
                self._finished += 1
                if not self._room.is_set():
                    self._room.set()
                if queue and not self._stopping.is_set():
                    self._ready.put_nowait(lane)
                else:
                    del self._lanes[lane]

    async def _handle(self, message: _pulsar.Message, ident: Ident) -> None:
        sub = self.sub
        data = message.data()
        try:
            payload = sub.decode(data)
        except DecodeError as exc:
            await self._give_up(message, ident, "undecodable", exc, attempts=1)
            return
        earlier = message.redelivery_count()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._call(payload, message, earlier + attempt)
            except UnreadableMessage as exc:
                await self._give_up(message, ident, "unreadable", exc, attempts=attempt)
                return
            except BaseException as exc:
                # Whatever a handler raises fails its message, CancelledError and
                # SystemExit included; only the bus's own cancellation goes through.
                if _cancelled_by_us(exc):
                    raise
                if attempt > sub.max_retries:
                    await self._give_up(message, ident, "handler-failed", exc, attempts=attempt)
                    return
                delay = min(sub.retry_backoff * 2 ** (attempt - 1), sub.retry_backoff_max)
                delay *= random.uniform(0.8, 1.2)
                log.warning(
                    "%s failed on %s (attempt %d of %d), retrying in %.2fs: %s",
                    sub.name, _describe(message), attempt, sub.max_retries + 1, delay, _text(exc),
                )
                if await self._sleep_unless_stopped(delay):
                    return  # unacknowledged: redelivered after shutdown
                payload = sub.decode(data)  # a fresh copy: the handler may have changed it
                continue
            self._ack(message, ident)
            self.handled += 1
            return

    async def _call(self, payload: Any, message: _pulsar.Message, attempt: int) -> None:
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        for name, kind in self.sub.extras:
            if kind == "payload":
                kwargs[name] = payload
            elif kind == "payload/":
                args = (payload,)
            elif kind == "message":
                kwargs[name] = self._metadata(message, attempt)
            else:
                kwargs[name] = self.bus
        if not self.sub.timeout:
            await self._invoke(args, kwargs)
            return
        # A deadline per call, enforced by _watchdog: a cancel scope per message
        # costs 5-7 us, more than the rest of the dispatch.
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = self._loop.time() + self.sub.timeout
        try:
            await self._invoke(args, kwargs)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
        finally:
            del self._deadlines[task]
        if task in self._timed_out:
            self._timed_out.discard(task)
            task.uncancel()
            # A thread cannot be stopped: a sync handler goes on running, abandoned.
            raise HandlerTimeout(f"the handler did not finish within {self.sub.timeout:g}s (subscribe(timeout=...))")

    async def _invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.sub.is_async:
            await self.sub.handler(*args, **kwargs)
        else:
            await anyio.to_thread.run_sync(functools.partial(self.sub.handler, *args, **kwargs), abandon_on_cancel=True)

    async def _watchdog(self) -> None:
        """Cancel each handler call that runs past the subscription's timeout."""
        timeout = self.sub.timeout
        assert timeout
        while not await self._sleep_unless_stopped(min(timeout / 4, 1.0)):
            now = self._loop.time()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()

    def _metadata(self, message: _pulsar.Message, attempt: int) -> Message:
        try:
            properties = message.properties()
        except UnicodeDecodeError as exc:
            raise UnreadableMessage(f"a property is not UTF-8 ({exc.object!r}): Message.properties cannot hold it") from None
        key = key_of(message)
        return Message(
            topic=message.topic_name(),
            key=(key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key) or None,
            properties=properties,
            message_id=message.message_id(),
            publish_time=from_millis(message.publish_timestamp()),
            event_time=from_millis(message.event_timestamp()),
            redelivery_count=message.redelivery_count(),
            attempt=attempt,
            data=message.data(),
        )

    def _ack(self, message: _pulsar.Message, ident: Ident) -> None:
        self._ack_again(message)
        self._acked.add(ident)
        self._acked_order.append(ident)
        if len(self._acked_order) > _REMEMBER_ACKED:
            self._acked.discard(self._acked_order.popleft())

    def _send_acks(self, consumer: _pulsar.Consumer) -> None:
        acks = self._acks
        while acks:
            consumer.acknowledge_async(acks.popleft(), _ignore)

    def _ack_again(self, message: _pulsar.Message) -> None:
        # The receive thread sends it: an acknowledgement costs the caller two
        # hand-overs of the GIL, which the loop, running every handler, cannot spare.
        self._acks.append(message)

    async def _sleep_unless_stopped(self, delay: float) -> bool:
        with anyio.move_on_after(delay):
            await self._stopping.wait()
            return True
        return False

    async def _give_up(
        self, message: _pulsar.Message, ident: Ident, reason: str, exc: BaseException, attempts: int
    ) -> None:
        """Dead-letter a message (or drop it when dead-lettering is off), then acknowledge it."""
        sub = self.sub
        error = _text(exc)
        if not sub.dead_letter:
            log.error("%s dropped %s after %d attempts (%s): %s", sub.name, _describe(message), attempts, reason, error)
            self._ack(message, ident)
            return
        try:
            properties = dict(message.properties())
        except UnicodeDecodeError:
            properties = {"eventbus-properties-lost": "a property was not UTF-8; the original ones are not copied"}
        properties.update(
            {
                "eventbus-dlq-reason": reason,
                "eventbus-error-type": _encodable(type(exc).__name__),
                "eventbus-error": _encodable(_detail(exc)),
                "eventbus-attempts": str(attempts),
                "eventbus-original-topic": message.topic_name(),
                "eventbus-original-message-id": str(message.message_id()),
                "eventbus-subscription": sub.group,
            }
        )
        delay = sub.retry_backoff or 0.5
        while True:
            try:
                await self.bus._send_raw(self.dlq_topic, message.data(), key=key_of(message) or None, properties=properties)
                break
            except Exception as dlq_exc:
                # Not acknowledged until it is safely dead-lettered; the key waits.
                self.dead_letter_failures += 1
                log.error(
                    "cannot dead-letter %s to %s (retrying in %.1fs): %s", _describe(message), self.dlq_topic, delay,
                    _text(dlq_exc),
                )
                if await self._sleep_unless_stopped(delay):
                    return
                delay = min(delay * 2, sub.retry_backoff_max)
        log.error(
            "%s dead-lettered %s to %s after %d attempt(s): %s", sub.name, _describe(message), self.dlq_topic,
            attempts, error,
        )
        self._ack(message, ident)


Ident = tuple[int, int, int, int]


class HandlerTimeout(Exception):
    """A handler ran past its subscription's `timeout`."""


class UnreadableMessage(Exception):
    """The client cannot hand over part of a message (a property that is not UTF-8)."""


def _ident(message: _pulsar.Message) -> tuple[int, int, int, int]:
    mid = message.message_id()
    return (mid.partition(), mid.ledger_id(), mid.entry_id(), mid.batch_index())


def key_of(message: _pulsar.Message) -> str | bytes:
    """The message's partition key: a str, or its bytes when they are not UTF-8 ("" for none)."""
    try:
        return message.partition_key()
    except UnicodeDecodeError as exc:  # the client decodes the whole key; the error holds its bytes
        return bytes(exc.object)


def _cancelled_by_us(exc: BaseException) -> bool:
    """True for the cancellation the bus itself asked for (drain timeout, stop), not one a handler raised."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _detail(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException:
        return "<str() of the exception raised>"


def _text(exc: BaseException) -> str:
    """``Type: message`` for any exception."""
    detail = _detail(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _encodable(text: str, limit: int = _ERROR_TEXT_MAX) -> str:
    """Text the client can write into a property: valid UTF-8 (lone surrogates escaped), bounded."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _describe(message: _pulsar.Message) -> str:
    key = key_of(message)
    return f"message {message.message_id()}{f' key={key!r}' if key else ''}"
