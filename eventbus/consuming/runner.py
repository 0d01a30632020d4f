"""Running one subscription: lease, subscribe, hand received messages to its lanes, handle, drain and close."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from ..broker.client import IdKey, RawMessage, entry_of, id_key, key_of
from ..broker.connect import Connection
from ..errors import EventBusError, SubscriptionFailed, text
from ..observing.events import Observer
from ..observing.metrics import Metrics
from ..observing.tracing import Tracing
from ..registry import Subscription
from ..service.dependencies import AppScope
from ..service.handler import Publisher
from ..settings import Settings
from .attempts import Handling, Sender, cancelled_by_us
from .batches import BatchHandling
from .payloads import payloads_for
from .dispatch import Dispatch
from .intake import Bounds, Intake
from .lanes import Lanes, MixedKeys, OrderedLanes
from .membership import Membership, State
from .outputs import OnceSender, Slot, place

log = logging.getLogger("eventbus")

#: Acknowledged ids remembered to drop redelivered copies (about 100 bytes each).
_REMEMBER_ACKED = 100_000


class SubscriptionRunner:
    """Consumes one (topic, group) for the life of `EventBus.run()`; read its state, not its insides."""

    def __init__(
        self, sub: Subscription, topic: str, connection: Connection, settings: Settings, *, bus: Publisher,
        dead_letters: Sender, metrics: Metrics | None = None, tracing: Tracing | None = None,
        observer: Observer | None = None, replays_for: str | None = None, app: AppScope | None = None,
        middleware: tuple[object, ...] = (), once: OnceSender | None = None, slot: Slot | None = None,
        nudge: asyncio.Event | None = None,
    ) -> None:
        """`replays_for`: this runner consumes the retry topic of that main topic (dead letters sent back by `eventbus
        dlq replay`): failures go to the main topic's dead-letter topic, and a retry topic that cannot be subscribed
        (auto-creation off) is logged and left, not fatal. `once`: where an effectively-once subscription's outputs
        go (None: at least once); `slot`: the part of a key_shared group's keys this runner takes (`KeySlots`; `nudge`)."""
        self.sub, self.topic, self.replays_for = sub, topic, replays_for
        self._settings, self._connection = settings, connection
        self._stopping = asyncio.Event()
        self._finished_handling = asyncio.Event()
        self._handling = (BatchHandling if sub.batch is not None else Handling)(
            sub, topic, bus, dead_letters, self._finished_handling, metrics, tracing, observer,
            dead_letter_topic=sub.dead_letter_topic(replays_for) if replays_for else None, app=app,
            middleware=middleware, once=once, slot=slot,
        )
        self._turns = self._handling.turns
        self._counts = metrics.subscription(topic, sub.group) if metrics is not None else None
        if self._counts is not None and slot is None:  # a group's key slots share its counts (`KeySlots`)
            self._counts.in_flight = lambda: self.in_flight
        self._lanes: Lanes[RawMessage, IdKey] = (
            Lanes(entry_of, _REMEMBER_ACKED) if self._turns is None else OrderedLanes(entry_of, _REMEMBER_ACKED, place)
        )
        #: Batches of several keys, noticed on key_shared (where they break order per key).
        self._mixed = MixedKeys[IdKey](entry_of) if sub.subscription_type == "key_shared" else None
        self._dispatch: Dispatch | None = None
        self._unique = itertools.count()
        self._intake: Intake | None = None
        self._intake_done = False
        self._membership = Membership(sub, topic, connection, settings, self._stopping, self._counts, replays_for, slot, nudge)
        self._consuming = False
        #: Copies of messages already in flight or acknowledged, dropped unhandled.
        self.duplicates = 0
        #: What killed the runner, if something did.
        self.failure: BaseException | None = None

    # -- what others may read ------------------------------------------------------

    @property
    def group(self) -> str:
        return self.sub.group

    @property
    def state(self) -> State:
        """starting, standby (another process or member consumes it), conflict (the group is held with another
        subscription type), consuming, or stopped."""
        return "consuming" if self._consuming else self._membership.state

    @property
    def subscription_type(self) -> str:
        """The subscription type asked of the broker (see `BrokerProfile.subscription_type`)."""
        return self._membership.subscription_type

    @property
    def in_flight(self) -> int:
        """Messages received and not yet finished (handled, dead-lettered, or dropped as copies)."""
        return self._intake.in_flight if self._intake is not None else 0

    @property
    def dead_letter_failures(self) -> int:
        """Dead-letter publishes that failed and were retried."""
        return self._handling.dead_letter_failures

    @property
    def ready(self) -> bool:
        """Standing by, or consuming on a connected consumer (what `/readyz` asks of each subscription)."""
        membership = self._membership
        if membership.state == "standby" or membership.left:
            return True
        consumer = membership.consumer
        return self._consuming and consumer is not None and consumer.connected

    def redeliver_unacknowledged(self) -> None:
        """Ask the broker to send again what this consumer holds unacknowledged (as after a reconnect)."""
        if self._membership.consumer is not None:
            self._membership.consumer.redeliver_unacknowledged()

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Try to subscribe once: raises what cannot cure itself; `run()` retries the rest."""
        await self._membership.start()

    async def run(self) -> None:
        """Consume until `stop()`; then finish in-flight handlers and close the consumer."""
        try:
            membership = self._membership
            if membership.left or (
                membership.consumer is None
                and not (await membership.take_lease() and await membership.subscribe_until_stopped())
            ):
                return
            assert membership.consumer is not None
            # A retry topic holds dead letters sent back, written with the main topic's schema versions.
            read_as = self.replays_for or self.topic
            self._handling.payloads = await payloads_for(self._connection, read_as, self.sub.handler)
            self._intake = Intake(membership.consumer, Bounds.of(self._settings), self._deliver, self._lanes.begun)
            if self._stopping.is_set():  # stopped while subscribing: take nothing
                self._intake.drain()
            self._dispatch = Dispatch(
                self._lanes, self._intake, self._finished_handling, self._stopping, self._after_each
            )
            self._consuming = True
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._guard, self._receive)
                for _ in range(self.sub.concurrency):
                    tg.start_soon(self._guard, self._worker)
                if self.sub.timeout:
                    tg.start_soon(self._guard, self._handling.watchdog)
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()
        if self.failure is not None:
            raise SubscriptionFailed(
                f"subscription {self.group!r} on {self.topic} stopped: {text(self.failure)}"
            ) from self.failure

    def stop(self) -> None:
        """Stop taking messages; handlers already running finish and are acknowledged. Loop thread only.

        The rest of every batch begun is handled too, everything else queued is left for the broker
        to send again (`Lanes.stop` says why).
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        left = self._lanes.stop(keep_queued=self._turns is not None)  # effectively once: none left (OrderedLanes)
        self._not_handled("left_at_stop", left)
        if self._intake is not None:
            self._intake.finish(left)
            self._intake.drain()
        else:
            self._intake_done = True  # never consumed
        self._finish_if_drained()

    def _finish_if_drained(self) -> None:
        """Once stopped, nothing more to take and nothing left to handle: the workers end."""
        if self._intake_done and self._lanes.empty and not self._finished_handling.is_set():
            self._finished_handling.set()
            if self._dispatch is not None:
                self._dispatch.wake(len(self._dispatch.idle))

    async def close(self) -> None:
        """Acknowledge what is done, close the consumer, then give up the lease."""
        if self._membership.consumer is not None:
            consumer, self._membership.consumer = self._membership.consumer, None
            if self._intake is not None:
                self._intake.send_acks()  # what came after the intake ended
            try:
                await self._handling.release()
                await consumer.close()
            except EventBusError as exc:
                log.warning("closing consumer %s/%s: %s", self.topic, self.group, exc)
        self._consuming = False
        self._membership.release()  # only once the consumer is closed: the next holder must find it gone

    async def _guard(self, part: Callable[[], Awaitable[None]]) -> None:
        """Run a part of the runner; one that dies stops the runner, loudly, so the worker exits non-zero."""
        try:
            await part()
        except BaseException as exc:
            if cancelled_by_us(exc):
                raise
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log.critical(
                "subscription %s group=%s died; stopping the worker: %s", self.topic, self.group, text(exc),
                exc_info=exc,
            )
        self.stop()

    # -- receiving and handling ---------------------------------------------------

    async def _receive(self) -> None:
        assert self._intake is not None
        try:
            await self._intake.run()
        finally:
            self._intake_finished()

    def _intake_finished(self) -> None:
        self._intake_done = True
        if self._stopping.is_set():
            self._finish_if_drained()

    def _not_handled(self, reason: str, count: int = 1) -> None:
        if self._counts is not None:
            self._counts.not_handled[reason] += count

    def _mixed_batch(self, seen: int) -> None:
        if self._counts is not None:
            self._counts.mixed_key_batches += 1
        if seen == 1:
            _warn_mixed(self.topic, self.sub.group)

    def _deliver(self, batch: list[RawMessage]) -> None:
        """A batch from the intake: into the lanes, and a worker woken per lane made ready."""
        try:
            self._admit(batch)
        except BaseException as exc:  # a bug: the batch's count can no longer be trusted
            self._die(exc)

    def _admit(self, batch: list[RawMessage]) -> None:
        assert self._intake is not None
        if self._counts is not None:
            self._counts.received += len(batch)
        admit, ordered, unique, mixed, turns = self._lanes.admit, self.sub.ordered, self._unique, self._mixed, self._turns
        for message in batch:
            # A key that is not UTF-8 (any producer may send one) is its lane as bytes.
            ident, key = id_key(message), key_of(message) if ordered else next(unique)
            if mixed is not None and mixed.seen(ident, key):
                self._mixed_batch(mixed.count)
            verdict = admit(message, ident, key)
            if turns is not None and verdict == "queued":
                turns.admit(*place(message))
            if verdict != "queued":
                self._intake.finish(1, message.length())
                if verdict == "left_at_stop":
                    self._not_handled("left_at_stop")
                    continue
                self.duplicates += 1
                self._not_handled("duplicate")
                if verdict == "acknowledged":
                    self._intake.acks.append(message)  # acknowledged before, yet here again: once more
        dispatch = self._dispatch
        if dispatch is not None and dispatch.idle:
            dispatch.wake(len(self._lanes.ready))

    async def _worker(self) -> None:
        assert self._dispatch is not None
        batch = self.sub.batch
        if batch is None:
            await self._dispatch.one_at_a_time(self._handling.handle)
        else:
            assert isinstance(self._handling, BatchHandling)
            await self._dispatch.in_batches(self._handling.handle_batch, batch.max_messages, batch.max_wait)

    def _after_each(self) -> None:
        if self._stopping.is_set() and self._lanes.empty:
            self._finish_if_drained()


def _warn_mixed(topic: str, group: str) -> None:
    log.warning(
        "%s group=%s: a batch holds messages of several keys (a producer batching regardless of keys: "
        "Java's and Go's default batchers); key_shared hands it whole to the member of its first key, so "
        "order per key does not hold for it: batch by key (Java BatcherBuilder.KEY_BASED, Go "
        "KeyBasedBatchBuilder) or not at all (counted in eventbus_mixed_key_batches)", topic, group,
    )


class RunningSubscription(Protocol):
    """What `EventBus.running` shows of a subscription being run (read-only)."""

    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def state(self) -> State: ...
    @property
    def subscription_type(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def dead_letter_failures(self) -> int: ...
    @property
    def failure(self) -> BaseException | None: ...
    def redeliver_unacknowledged(self) -> None: ...
