"""Producers: one per topic, created once and reused; sends confirmed through callbacks."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Iterable, Mapping

from ..broker.bridge import LoopBridge
from ..broker.client import OK, Client, MessageId, Producer, RawMessage, Result, build_message, sibling_ids
from ..errors import BrokerUnavailable, ConfigError, EventBusError, PublishError
from ..observing.metrics import Metrics
from ..schemas import PayloadSchema
from ..service.returns import REPLY_TOPIC_PREFIX
from ..settings import Settings

log = logging.getLogger("eventbus")

_NEVER_MS = 24 * 3600 * 1000
#: A reply topic's producer closes after this long without a reply: a responder answering 500 requester buses
#: kept 501 producers until it stopped, and each kept its requester's reply topic alive on the broker.
IDLE_REPLY_SECONDS = 60.0
_GROUP_BYTES_MAX = 1024 * 1024
#: The client's results while a topic has no live owner (its broker died, it is being unloaded or split):
#: a later try reaches the new owner. Anything else (terminated, refused) is final.
_FAILOVER = frozenset({
    "Timeout", "ConnectError", "ServiceUnitNotReady", "TooManyLookupRequestException", "LookupError",
    "NotConnected", "BrokerMetadataError", "BrokerPersistenceError",
})


class Slots:
    """A first-come, first-served counting semaphore whose free path is one comparison.

    Per-key publish order rests on it: a publish enqueues in the order it was handed a slot,
    so a slot freed while publishes wait goes to the first of them, and nobody takes a free
    slot past a waiter or past one handed a slot that has not run yet. (asyncio's Semaphore
    builds a generator per acquire; the first cut of this one let a newcomer take a slot a
    waiter had been woken for, and the waiter queue again at the back: 3,190 per-key
    inversions in 5,000 publishes with 16 slots.)
    """

    def __init__(self, count: int) -> None:
        self.free = self._count = count
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Waiters handed a slot that have not resumed yet: they come before any newcomer.
        self._handed = 0
        self._idle: asyncio.Future[None] | None = None

    @property
    def taken(self) -> int:
        """Slots in use: messages handed to the producer and not yet confirmed (or failed)."""
        return self._count - self.free

    def take_nowait(self) -> bool:
        """Take a slot if one is free and nobody is before us."""
        if self.free > 0 and not self._waiters and not self._handed:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.take_nowait():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._handed -= 1  # handed a slot, then cancelled: pass it on
                self.release()
            else:
                if waiter in self._waiters:  # not yet passed over by a hand-over
                    self._waiters.remove(waiter)
                self._hand_over()
            raise
        self._handed -= 1
        self._hand_over()  # slots freed while it was handed its own go to those queued behind it

    def release(self, count: int = 1) -> None:
        self.free += count
        self._hand_over()

    def _hand_over(self) -> None:
        waiters = self._waiters
        while self.free > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled one is done
                waiter.set_result(None)
                self.free -= 1
                self._handed += 1
        idle = self._idle
        if idle is not None and self.free >= self._count and not waiters and not idle.done():
            idle.set_result(None)

    async def drained(self) -> None:
        """Wait until every slot is free and nobody waits for one."""
        while self.free < self._count or self._waiters:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle


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
        producer: Producer,
        bridge: LoopBridge,
        max_pending: int,
        *,
        group_messages: int = 0,
        group_bytes: int = 0,
        group_delay: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.topic = topic
        self._producer = producer
        # With metrics on, receipts go through _done_timed, which counts and times them first.
        self._counts = metrics.topic(topic) if metrics is not None else None
        self._bridge = bridge
        # The client's own queue would reject past its limit; waiting here instead
        # turns a burst into backpressure rather than errors.
        self._slots = Slots(max_pending)
        self._group_messages = group_messages  # 0: a receipt per message
        self._group_bytes = group_bytes
        self._group_delay = group_delay
        self._queue: list[tuple[RawMessage, str, int, asyncio.Future[MessageId]]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.closing = False
        #: Messages sent so far: `Producers` closes a reply topic's producer once it stops growing.
        self.sent = 0

    async def send(
        self, message: RawMessage, key: str | bytes | None = None, size: int = 0, *, batchable: bool = True
    ) -> MessageId:
        """Send and wait until the broker confirmed the message.

        `key` and `size` must be the message's partition key and size (from `build_message`).
        """
        if not self.reserve_nowait():
            await self.reserve()
        return await self.enqueue(message, key, size, batchable)

    async def submit(
        self, message: RawMessage, key: str | bytes | None = None, size: int = 0, *, batchable: bool = True
    ) -> asyncio.Future[MessageId]:
        """Send; the returned future resolves when the broker confirmed the message."""
        await self.reserve()
        return self.enqueue(message, key, size, batchable)

    def reserve_nowait(self) -> bool:
        """Take a pending slot if one is free; `enqueue` then uses it."""
        if self.closing:
            raise self.closed_error()
        return self._slots.take_nowait()

    async def reserve(self) -> None:
        """Wait for a pending slot; a publish waiting when `close()` begins is still sent."""
        if self.closing:
            raise self.closed_error()
        await self._slots.acquire()

    def last_sequence_id(self) -> int:
        """The highest sequence id stored under this producer's name (-1: none, or no deduplication)."""
        return self._producer.last_sequence_id()

    def closed_error(self) -> PublishError:
        return PublishError(self.topic, "BusClosed", maybe_stored=False)

    def enqueue(
        self, message: RawMessage, key: str | bytes | None, size: int, batchable: bool
    ) -> asyncio.Future[MessageId]:
        """Send on a reserved slot; the future resolves when the broker confirmed the message."""
        loop = self._bridge.loop
        future: asyncio.Future[MessageId] = loop.create_future()
        self.sent += 1
        if not (self._group_messages and batchable):
            try:
                if self._counts is None:
                    self._producer.send(message, functools.partial(self._bridge.call, self._done, [future]))
                else:
                    timed = functools.partial(self._done_timed, started=time.perf_counter())
                    self._producer.send(message, functools.partial(self._bridge.call, timed, [future]))
            except BaseException:
                self._slots.release()
                raise
            return future
        queue = self._queue
        # The client batches by the key's bytes: a bytes key and its str spelling share a batch.
        if isinstance(key, bytes):
            key = key.decode("utf-8", "surrogateescape")
        queue.append((message, key or "", size, future))
        if len(queue) >= self._group_messages:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_soon(self._dispatch)
        elif self._timer is None:
            # Nothing sent awaits its receipt: no burst to gather, so the group goes at the loop's next turn
            # (with what else this turn enqueued). The delay cost a request at one in flight two waits of 1-2 ms
            # (the loop's timer rounds up): 7.5 ms on the embedded broker, 3.8 ms without.
            alone = self._slots.taken == len(queue)
            self._timer = (
                loop.call_later(self._group_delay, self._dispatch)
                if self._group_delay and not alone else loop.call_soon(self._dispatch)
            )
        return future

    def _dispatch(self) -> None:
        self._timer = None
        queue, self._queue = self._queue, []
        send = self._producer.send
        call = self._bridge.call
        done = self._done
        if self._counts is not None:
            done = functools.partial(self._done_timed, started=time.perf_counter())
        limit, budget = self._group_messages, self._group_bytes
        start, count = 0, len(queue)
        while start < count:
            # The group: what the client's batch container takes without flushing it.
            end, total = start + 1, queue[start][2]
            while end < count and end - start < limit and total + queue[end][2] < budget:
                total += queue[end][2]
                end += 1
            last = {entry[1]: i for i, entry in enumerate(queue[start:end], start)}
            # A key's messages of the group: one batch, settled by the receipt of its last message.
            covered: dict[str, list[asyncio.Future[MessageId]]] = {}
            i = start
            try:
                for i in range(start, end):
                    message, key, _, future = queue[i]
                    futures = covered.get(key)
                    if futures is None:
                        futures = covered[key] = []
                    futures.append(future)
                    send(message, functools.partial(call, done, futures) if last[key] == i else None)
            except Exception as exc:
                # No receipt will come for the keys whose last message was not sent.
                orphans = [f for k, futures in covered.items() if last[k] >= i for f in futures]
                self._fail([*orphans, *(entry[3] for entry in queue[i + 1 :])], exc)
                return
            finally:
                self._producer.flush_soon()
            start = end

    def _fail(self, futures: list[asyncio.Future[MessageId]], exc: Exception) -> None:
        self._slots.release(len(futures))
        if self._counts is not None:
            self._counts.errors[type(exc).__name__] += len(futures)
        for future in futures:
            if not future.done():
                # Earlier messages of its key were handed to the client: stored or not, nobody can tell.
                future.set_exception(PublishError(self.topic, type(exc).__name__, str(exc), maybe_stored=True))

    def _done(self, futures: list[asyncio.Future[MessageId]], result: Result, message_id: MessageId) -> None:
        """The receipt of a batch's last message, for every message of the batch this producer sent."""
        self._slots.release(len(futures))
        if result == OK:
            if len(futures) == 1:
                if not futures[0].done():
                    futures[0].set_result(message_id)
                return
            # A batch's messages share its entry; each is told apart by its index.
            if message_id.batch_index() != len(futures) - 1:
                # Not one whole batch (a client that batches otherwise): the
                # receipt names only the last message; the others' ids are unknown.
                *rest, last = futures
                if not last.done():
                    last.set_result(message_id)
                error = PublishError(self.topic, "UnknownId", f"receipt {message_id} does not cover {len(futures)} messages")
                for future in rest:
                    if not future.done():
                        future.set_exception(error)
                return
            for future, sibling in zip(futures, sibling_ids(message_id, len(futures))):
                if not future.done():
                    future.set_result(sibling)
        else:
            for future in futures:
                if not future.done():
                    future.set_exception(PublishError(self.topic, result.name))

    def _done_timed(
        self, futures: list[asyncio.Future[MessageId]], result: Result, message_id: MessageId, *, started: float
    ) -> None:
        """`_done`, counted and timed (from the group's hand-over to the client until this receipt)."""
        counts = self._counts
        assert counts is not None
        counts.durations.observe(time.perf_counter() - started)
        if result == OK:
            counts.published += len(futures)
        else:
            counts.errors[result.name] += len(futures)
        self._done(futures, result, message_id)

    async def close(self) -> None:
        """Refuse new publishes, settle every accepted one with its true outcome, then close."""
        self.closing = True
        try:
            await self._slots.drained()
            await self._producer.flush()
        finally:
            await self._producer.close()


async def create_producer(
    client: Client, topic: str, settings: Settings, bridge: LoopBridge, metrics: Metrics | None = None,
    schema: PayloadSchema | None = None, name: str | None = None,
) -> TopicProducer:
    """The topic's producer; a broker that cannot serve it yet (a failover) is asked again until the publish deadline.

    `name`: a producer of that name that does not batch, each message confirmed alone (effectively-once outputs:
    the broker deduplicates a batch by its first and last ids, and stores a batch that straddles its highest whole).

    While a dead broker's topics wait for a new owner (its metadata session, 30 s by Pulsar's default)
    the client's lookup and connect fail after its operation timeout; the publish waiting for this
    producer would fail with them although the next try succeeds (measured on scripts/pulsar-cluster).
    """
    deadline = time.monotonic() + settings.producer_send_timeout_ms / 1000 if settings.producer_send_timeout_ms else None
    pause = 0.2
    while True:
        try:
            return await _create_producer(client, topic, settings, bridge, metrics, schema, name)
        except BrokerUnavailable as exc:
            # A named producer's name is held until its last holder closes it (a key slot moving between members).
            again = exc.result in _FAILOVER or (name is not None and exc.result == "ProducerBusy")
            if not again or deadline is not None and time.monotonic() + pause > deadline:
                raise
            log.warning("creating the producer of %s: %s; trying again in %.1fs", topic, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def _create_producer(
    client: Client, topic: str, settings: Settings, bridge: LoopBridge, metrics: Metrics | None,
    schema: PayloadSchema | None, name: str | None = None,
) -> TopicProducer:
    # A partitioned topic, even of one partition, names its partitions ("...-partition-0").
    grouped = name is None and await client.partitions(topic) == [topic]
    producer = await client.create_producer(
        topic,
        batching=name is None,
        batching_max_messages=settings.producer_batching_max_messages,
        batching_max_bytes=settings.producer_batching_max_bytes,
        # When grouped the bus flushes every group itself; the client's timer must never cut one.
        batching_max_delay_ms=_NEVER_MS if grouped else settings.producer_batching_max_delay_ms,
        compression=settings.producer_compression,
        send_timeout_ms=settings.producer_send_timeout_ms,
        max_pending_messages=settings.producer_max_pending_messages,
        producer_name=name or settings.producer_name,
        schema=schema,
    )
    if not grouped:
        return TopicProducer(topic, producer, bridge, settings.producer_max_pending_messages, metrics=metrics)
    return TopicProducer(
        topic, producer, bridge, settings.producer_max_pending_messages, metrics=metrics,
        group_messages=min(settings.producer_batching_max_messages, settings.producer_max_pending_messages),
        # Below the broker's 5 MB message limit too: a batch that big would fail whole.
        group_bytes=min(settings.producer_batching_max_bytes, _GROUP_BYTES_MAX),
        group_delay=settings.producer_batching_max_delay_ms / 1000,
    )


#: How long a new producer waits for its topic's schema before it goes ahead without checking it.
_SCHEMA_CHECK_SECONDS = 5.0
#: Schema types whose readers read what the bus writes (JSON, or text).
_WRITABLE = frozenset({"JSON", "STRING"})


async def refuse_unwritable(client: Client, topic: str) -> None:
    """Raise `ConfigError` when the topic's registered schema is one whose readers cannot read the bus's JSON (AVRO,
    PROTOBUF, ...): stored there, every message would fail its readers. A topic without a schema takes anything."""
    try:
        # Bounded: during a failover the lookup waits for a new owner (the client's 30 s operation timeout), and
        # the producer's own creation has the publish deadline to ride that out; this check must not eat it.
        found = await asyncio.wait_for(client.schema(topic), _SCHEMA_CHECK_SECONDS)
    except (EventBusError, TimeoutError) as exc:
        log.debug("cannot read the schema of %s before publishing there (%s)", topic, exc or "no answer")
        return
    if found is not None and found.kind not in _WRITABLE:
        raise ConfigError(
            f"cannot publish to {topic}: its registered schema is {found.kind}, whose readers cannot read the JSON "
            f"(or bytes) the bus writes; publish to a topic of the app's own, or let a {found.kind} producer write this one"
        )


class Producers:
    """The bus's producers: one per topic, created on first use, shared by short and full names."""

    def __init__(
        self, client: Client, settings: Settings, bridge: LoopBridge, metrics: Metrics | None = None,
        schemas: Mapping[str, PayloadSchema] | None = None, registry: bool = False,
    ) -> None:
        """`schemas`: what each declared topic's producer registers; `registry`: the broker keeps schemas (Apache
        Pulsar), so a topic whose schema the bus cannot write is refused before anything is stored there."""
        self._client = client
        #: The schema each topic's producer registers, by full topic name (the app's declared payload types).
        self.schemas: Mapping[str, PayloadSchema] = schemas or {}
        self._registry = registry
        self._metrics = metrics
        self._settings = settings
        self._bridge = bridge
        self._tasks: dict[str, asyncio.Task[TopicProducer]] = {}
        #: Producers ready to use, by the name publish was given (its fast path).
        self.ready: dict[str, TopicProducer] = {}
        self.closed = False
        self._retained: set[str] = set()
        #: Idle reply producers being closed (`_close_if_idle`), awaited by `close`.
        self._closing: set[asyncio.Task[None]] = set()

    async def _create(self, topic: str) -> TopicProducer:
        schema = self.schemas.get(topic)
        if schema is None and self._registry and not topic.rsplit("/", 1)[-1].startswith(REPLY_TOPIC_PREFIX):
            await refuse_unwritable(self._client, topic)
        return await create_producer(self._client, topic, self._settings, self._bridge, self._metrics, schema)

    async def create_named(self, topic: str, name: str) -> TopicProducer:
        """An unbatched producer of that name on `topic` (a full name), registering the topic's schema."""
        schema = self.schemas.get(topic)
        return await create_producer(self._client, topic, self._settings, self._bridge, self._metrics, schema, name)

    @property
    def topics(self) -> list[str]:
        """The full names of the topics a producer exists or is being created for."""
        return sorted({producer.topic for producer in self.ready.values()} | {t for t in self._tasks if "://" in t})

    async def get(self, topic: str) -> TopicProducer:
        """The producer of `topic` (short or full name), created on first use."""
        task = self._tasks.get(topic)
        if task is None or failed(task):
            if self.closed:
                raise PublishError(topic, "BusClosed", maybe_stored=False)
            full = self._settings.topic(topic)
            task = self._tasks.get(full)
            if task is None or failed(task):
                task = asyncio.ensure_future(self._create(full))
                self._tasks[full] = task
                if full.rsplit("/", 1)[-1].startswith(REPLY_TOPIC_PREFIX):
                    asyncio.get_running_loop().call_later(IDLE_REPLY_SECONDS, self._close_if_idle, full, task, -1)
            self._tasks[topic] = task
        producer = await asyncio.shield(task)
        if self._tasks.get(topic) is task:  # not closed meanwhile
            self.ready[topic] = producer
        return producer

    async def send(
        self,
        topic: str,
        data: bytes,
        *,
        key: str | bytes | None,
        properties: Mapping[str, str],
        event_time: int | None = None,
        sequence_id: int | None = None,
    ) -> MessageId:
        """Publish bytes as they are (no content type added): dead letters, and their replays, keep the original's."""
        producer = await self.get(topic)
        message, size = build_message(
            data, None, key=key, properties=properties, event_time=event_time, sequence_id=sequence_id
        )
        return await producer.send(message, key, size)

    async def retain(self, topic: str, subscription: str) -> None:
        """Make sure `subscription` exists on `topic` (from its start), once per process, so the broker keeps its messages.

        Apache Pulsar keeps no message of a topic without a subscription: with its defaults such a
        topic is deleted a minute after its last producer leaves (brokerDeleteInactiveTopicsEnabled),
        and its ledgers are trimmed. A dead-letter topic has none of its own.
        """
        if topic in self._retained:
            return
        try:
            consumer = await self._client.subscribe(
                topic, subscription, subscription_type="shared", initial_position="earliest", receiver_queue_size=1,
                consumer_name=f"{subscription}-retain", batch_index_ack=False,
            )
        except EventBusError as exc:
            if exc.result != "ConsumerBusy":
                raise
            # A replay holds it (an exclusive consumer): it exists, which is all this asks.
        else:
            await consumer.close()
        self._retained.add(topic)

    def _close_if_idle(self, full: str, task: asyncio.Task[TopicProducer], seen: int) -> None:
        """A reply topic's producer: closed after one to two `IDLE_REPLY_SECONDS` without a reply, else looked at again."""
        if self.closed or self._tasks.get(full) is not task or not task.done() or failed(task):
            return
        producer = task.result()
        if producer.sent != seen:
            asyncio.get_running_loop().call_later(IDLE_REPLY_SECONDS, self._close_if_idle, full, task, producer.sent)
            return
        for name in [name for name, known in self._tasks.items() if known is task]:
            del self._tasks[name]  # the next reply there makes a new producer
            self.ready.pop(name, None)
        closing = asyncio.ensure_future(producer.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Refuse new publishes; settle every accepted one; close each producer once."""
        self.closed = True
        tasks = list({id(t): t for t in self._tasks.values()}.values())
        self._tasks = {}
        self.ready = {}
        await close_producers(tasks, self._closing)


async def close_producers(tasks: Iterable[asyncio.Task[TopicProducer]], closing: set[asyncio.Task[None]]) -> None:
    """Wait for the idle producers being closed, then close each producer made; one never made already failed the
    publish that wanted it, saying why."""
    if closing:
        await asyncio.wait(closing)

    async def close_one(task: asyncio.Task[TopicProducer]) -> None:
        if failed(task):
            return
        try:
            producer = await task
            await producer.close()
        except Exception as exc:
            log.warning("closing producer: %s", exc)

    await asyncio.gather(*(close_one(task) for task in tasks))


def failed(task: asyncio.Task[TopicProducer]) -> bool:
    """Whether the producer's creation failed (or was cancelled)."""
    return task.done() and (task.cancelled() or task.exception() is not None)
