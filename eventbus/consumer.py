"""Running one subscription: lease, subscribe, receive, dispatch by key, acknowledge, drain and close."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import anyio

from .bridge import LoopBridge
from .client import Client, Consumer, ConsumerClosed, Ident, RawMessage, ident_of, key_of
from .embedded import SubscriptionLease
from .errors import EventBusError, Failure, SubscriptionFailed, classify
from .events import Observer
from .handler import Publisher
from .errors import text
from .handling import Handling, Sender, cancelled_by_us, sleep_unless
from .metrics import Metrics
from .tracing import Tracing
from .profile import BrokerProfile
from .registry import Subscription
from .settings import Settings

log = logging.getLogger("eventbus")

State = Literal["starting", "standby", "consuming", "stopped"]
_STOP = object()
#: How long the receive thread blocks before it looks at the stop flag again: a stop waits up to this
#: long. Idle, the example app's 8 consumers used 0.9 % of a core at 100 ms and 2.9 % at 25 ms.
_POLL_MS = 100
#: Messages the receive thread hands the loop per wake-up at most.
_HANDOFF = 256
#: How often a standby process looks whether the subscription's lease is free.
_LEASE_POLL = 0.25
#: How often a standby member asks Apache Pulsar for the exclusive subscription: first, and at most.
_STANDBY_POLL = (0.5, 5.0)
#: Retrying a subscribe that failed: first delay, and at most.
_RETRY = (1.0, 30.0)
#: Acknowledged ids remembered to drop redelivered copies (about 100 bytes each).
_REMEMBER_ACKED = 100_000


class SubscriptionRunner:
    """Consumes one (topic, group) for the life of `EventBus.run()`; read its state, not its insides."""

    def __init__(
        self,
        sub: Subscription,
        topic: str,
        *,
        client: Client,
        profile: BrokerProfile,
        bridge: LoopBridge,
        settings: Settings,
        bus: Publisher,
        dead_letters: Sender,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        observer: Observer | None = None,
        replays_for: str | None = None,
    ) -> None:
        """`replays_for`: this runner consumes the retry topic of that main topic (dead letters sent back
        by `eventbus dlq replay`): failures go to the main topic's dead-letter topic, and a retry topic
        that cannot be subscribed (auto-creation off) is logged and left, not fatal."""
        self.sub = sub
        self.replays_for = replays_for
        self.topic = topic
        self._client = client
        self._profile = profile
        self._bridge = bridge
        self._settings = settings
        self._stopping = asyncio.Event()
        self._finished_handling = asyncio.Event()
        self._handling = Handling(
            sub, topic, bus, dead_letters, self._finished_handling, metrics, tracing, observer,
            dead_letter_topic=sub.dead_letter_topic(replays_for) if replays_for else None,
        )
        self._counts = metrics.subscription(topic, sub.group) if metrics is not None else None
        if self._counts is not None:
            self._counts.in_flight = lambda: self.in_flight
        # Read by the receive thread: after stop it takes only the rest of the batches already begun.
        self._draining = False
        self._begun: frozenset[tuple[int, int, int]] = frozenset()
        self._intake_done = False
        self._closed_lanes: set[object] = set()
        self._consumer: Consumer | None = None
        self._lease: SubscriptionLease | None = profile.lease(topic, sub.group)
        self._state: State = "starting"
        # A lane is a key (ordered subscriptions) or a single message (shared);
        # a lane is in _lanes while it is queued in _queued or being handled.
        self._lanes: dict[object, collections.deque[tuple[RawMessage, Ident]]] = {}
        self._queued: asyncio.Queue[object] = asyncio.Queue()
        self._unique = itertools.count()
        # Written by one thread each, so their difference is safe to read anywhere.
        self._received = 0
        self._finished = 0
        self._room = threading.Event()
        self._acks: collections.deque[RawMessage] = collections.deque()
        # Ids being handled, and ids acknowledged lately: a broker may hand a
        # message over again (after a reconnect, or pulsar-lite's single-active
        # dispatchers, which replay), and a second copy must not run twice.
        self._active: set[Ident] = set()
        self._acked: set[Ident] = set()
        self._acked_order: collections.deque[Ident] = collections.deque()
        #: Copies of messages already in flight or acknowledged, dropped unhandled.
        self.duplicates = 0
        #: What killed the runner, if something did.
        self.failure: BaseException | None = None
        # A retry topic that cannot be subscribed, left alone (see `replays_for`).
        self._left = False

    # -- what others may read ------------------------------------------------------

    @property
    def group(self) -> str:
        return self.sub.group

    @property
    def state(self) -> State:
        """starting, standby (another process or member consumes it), consuming, or stopped."""
        return self._state

    @property
    def subscription_type(self) -> str:
        """The subscription type asked of the broker (see `BrokerProfile.subscription_type`)."""
        return self._profile.subscription_type(self.sub.subscription_type)

    @property
    def in_flight(self) -> int:
        """Messages received and not yet finished (handled, dead-lettered, or dropped as copies)."""
        return self._received - self._finished

    @property
    def dead_letter_failures(self) -> int:
        """Dead-letter publishes that failed and were retried."""
        return self._handling.dead_letter_failures

    @property
    def ready(self) -> bool:
        """Standing by, or consuming on a connected consumer (what `/readyz` asks of each subscription)."""
        if self._state == "standby" or self._left:
            return True
        consumer = self._consumer
        return self._state == "consuming" and consumer is not None and consumer.connected

    def redeliver_unacknowledged(self) -> None:
        """Ask the broker to send again what this consumer holds unacknowledged (as after a reconnect)."""
        if self._consumer is not None:
            self._consumer.redeliver_unacknowledged()

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Try to subscribe once: raises what cannot cure itself; `run()` retries the rest."""
        if self._lease is not None and not self._lease.acquire():
            return  # another process consumes it on the embedded broker; run() stands by
        try:
            await self._subscribe()
        except EventBusError as exc:
            if classify(exc.result or "") is not Failure.TRANSIENT:
                if self._leave(exc):
                    return
                raise
            # The broker is there (the handshake said so) but busy, restarting, or
            # holding the subscription for another member: run() keeps trying.
            if exc.result != "ConsumerBusy":  # a standby member: run() says so
                log.warning(
                    "cannot subscribe %s group=%s yet (%s): retrying until it works or the worker stops",
                    self.topic, self.group, exc,
                )

    async def run(self) -> None:
        """Consume until `stop()`; then finish in-flight handlers and close the consumer."""
        try:
            if self._left or (
                self._consumer is None and not (await self._take_lease() and await self._subscribe_until_stopped())
            ):
                return
            self._state = "consuming"
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

        The client acknowledges a batch to the broker only once every message of it is
        acknowledged, and forgets a partial one when the consumer closes: the broker then
        sends the whole batch again, the messages handled before the stop included. So the
        rest of every batch begun (a message of it handled or running) is handled too;
        everything else queued is left unacknowledged, for the broker to send again.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        queued = {ident for queue in self._lanes.values() for _, ident in queue}
        running = self._active - queued  # a lane's running message is no longer in its queue
        begun = {ident[:3] for ident in itertools.chain(running, self._acked) if ident[3] >= 0}
        self._begun = frozenset(begun)
        for lane, queue in self._lanes.items():
            keep = 0
            for _, ident in queue:
                if ident[:3] not in begun:
                    break
                keep += 1
            if keep < len(queue):
                # A lane stays in order: the rest of a begun batch behind a message left over is left too.
                self._closed_lanes.add(lane)
                for _ in range(len(queue) - keep):
                    self._active.discard(queue.pop()[1])
                    self._finished += 1
                    self._not_handled("left_at_stop")
        waiting = []
        while not self._queued.empty():
            waiting.append(self._queued.get_nowait())
        for lane in waiting:
            if self._lanes[lane]:
                self._queued.put_nowait(lane)
            else:
                del self._lanes[lane]
        self._draining = True
        self._room.set()
        self._finish_if_drained()

    def _finish_if_drained(self) -> None:
        """Once stopped, nothing more to take and nothing left to handle: the workers end."""
        if self._intake_done and not self._lanes and not self._finished_handling.is_set():
            self._finished_handling.set()
            for _ in range(self.sub.concurrency):
                self._queued.put_nowait(_STOP)

    async def close(self) -> None:
        """Acknowledge what is done, close the consumer, then give up the lease."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            self._send_acks(consumer)  # what came after the receive thread ended
            try:
                await consumer.close()
            except EventBusError as exc:
                log.warning("closing consumer %s/%s: %s", self.topic, self.group, exc)
            self._lanes.clear()
        # Only once the consumer is closed: the next holder must find it gone.
        if self._lease is not None:
            self._lease.release()
        self._state = "stopped"

    async def _take_lease(self) -> bool:
        lease = self._lease
        if lease is None or lease.acquire():
            return True
        self._state = "standby"
        log.info(
            "standby: another process consumes %s group=%s on the embedded broker; taking over when it leaves",
            self.topic, self.group,
        )
        while not await sleep_unless(self._stopping, _LEASE_POLL):
            if lease.acquire():
                log.info("taking over %s group=%s", self.topic, self.group)
                return True
        return False

    async def _subscribe_until_stopped(self) -> bool:
        """Subscribe, retrying what may cure itself with one backoff; raise the rest."""
        delay, poll = _RETRY[0], _STANDBY_POLL[0]
        busy = False
        while not self._stopping.is_set():
            try:
                await self._subscribe()
                if busy:
                    log.info("taking over %s group=%s", self.topic, self.group)
                return True
            except EventBusError as exc:
                if classify(exc.result or "") is not Failure.TRANSIENT:
                    if self._leave(exc):
                        return False
                    raise
                if exc.result == "ConsumerBusy":
                    # Another member holds the exclusive subscription: take over as soon as it leaves.
                    if not busy:
                        busy = True
                        self._state = "standby"
                        log.info(
                            "standby: another member consumes %s group=%s (%s); taking over when it leaves",
                            self.topic, self.group, self.subscription_type,
                        )
                    if await sleep_unless(self._stopping, poll):
                        break
                    # Each refused subscribe is a ConsumerBusy line in the client's log: ask less often.
                    poll = min(poll * 1.5, _STANDBY_POLL[1])
                    continue
                log.warning("still cannot subscribe %s group=%s (%s); next try in %.0fs", self.topic, self.group, exc, delay)
            if await sleep_unless(self._stopping, delay):
                break
            delay = min(delay * 2, _RETRY[1])
        return False

    def _leave(self, exc: EventBusError) -> bool:
        """For a retry topic that cannot be subscribed: say what replaying needs, and leave it (True)."""
        if self.replays_for is None or exc.result in ("AuthenticationError", "AuthorizationError"):
            return False
        self._left = True
        log.warning(
            "cannot subscribe %s group=%s, where `eventbus dlq replay` sends this group's dead letters back (%s); "
            "the group runs without it: create the topic to replay into it", self.topic, self.group, exc,
        )
        return True

    async def _subscribe(self) -> None:
        sub = self.sub
        self._consumer = await self._client.subscribe(
            self.topic,
            sub.group,
            subscription_type=self.subscription_type,
            initial_position=sub.initial_position,
            receiver_queue_size=self._settings.consumer_receiver_queue_size,
            consumer_name=f"{socket.gethostname()}-{os.getpid()}-{sub.group}",
            batch_index_ack=self._profile.batch_index_ack,
        )
        if self._counts is not None:
            self._counts.subscribes += 1
        asked = self.subscription_type
        shown = asked if asked == sub.subscription_type else f"{asked} (for {sub.subscription_type} on {self._profile.server_version})"
        log.info(
            "subscribed %s group=%s subscription_type=%s concurrency=%d -> %s",
            self.topic, sub.group, shown, sub.concurrency, sub.name,
        )

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

    # -- receiving (a thread of its own: the client's receive blocks) -----------

    async def _receive(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._receive_thread, limiter=anyio.CapacityLimiter(1))
        finally:
            # Through the bridge: after the last batch the thread handed over.
            self._bridge.call(self._intake_finished)

    def _intake_finished(self) -> None:
        self._intake_done = True
        if self._stopping.is_set():
            self._finish_if_drained()

    def _receive_thread(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        call = self._bridge.call
        limit = self._settings.consumer_max_in_flight
        room = self._room
        while True:
            self._send_acks(consumer)
            if self._draining:
                self._receive_rest(consumer)
                return
            free = limit - (self._received - self._finished)
            if free <= 0:
                room.clear()
                if self._received - self._finished >= limit:
                    room.wait(_POLL_MS / 1000)
                continue
            try:
                batch = consumer.receive(min(free, _HANDOFF), _POLL_MS)
            except ConsumerClosed:
                return
            if batch:
                self._received += len(batch)
                call(self._enqueue, batch)

    def _receive_rest(self, consumer: Consumer) -> None:
        """After stop: take the messages of begun batches still in the client's queue (a batch arrives whole)."""
        begun = self._begun
        while True:
            try:
                batch = consumer.receive(_HANDOFF, 0)
            except ConsumerClosed:
                return
            rest = list(itertools.takewhile(lambda m: ident_of(m)[:3] in begun, batch))
            if rest:
                self._received += len(rest)
                self._bridge.call(self._enqueue, rest)
            if len(rest) < len(batch) or not batch:
                return  # the rest of the queue is left unacknowledged: the broker sends it again

    def _enqueue(self, batch: list[RawMessage]) -> None:
        try:
            self._dispatch(batch)
        except BaseException as exc:  # a bug: the batch's count can no longer be trusted
            self._die(exc)

    def _not_handled(self, reason: str) -> None:
        if self._counts is not None:
            self._counts.not_handled[reason] += 1

    def _dispatch(self, batch: list[RawMessage]) -> None:
        if self._counts is not None:
            self._counts.received += len(batch)
        stopping = self._stopping.is_set()
        ordered = self.sub.ordered
        lanes = self._lanes
        active = self._active
        for message in batch:
            ident = ident_of(message)
            if ident in active or ident in self._acked:
                self.duplicates += 1
                self._finished += 1
                self._not_handled("duplicate")
                if ident not in active:
                    self._acks.append(message)  # acknowledged before, yet here again: once more
                continue
            # A key that is not UTF-8 (any producer may send one) is its lane as bytes.
            lane: object = key_of(message) if ordered else next(self._unique)
            if stopping and (ident[:3] not in self._begun or lane in self._closed_lanes):
                self._closed_lanes.add(lane)  # left for the broker to send again, and its lane's later ones
                self._finished += 1
                self._not_handled("left_at_stop")
                continue
            active.add(ident)
            queue = lanes.get(lane)
            if queue is None:
                lanes[lane] = collections.deque(((message, ident),))
                self._queued.put_nowait(lane)
            else:
                queue.append((message, ident))

    # -- handling ----------------------------------------------------------------

    async def _worker(self) -> None:
        handle = self._handling.handle
        while True:
            lane = await self._queued.get()
            if lane is _STOP:
                return
            queue = self._lanes[lane]
            message, ident = queue.popleft()
            try:
                if await handle(message):
                    self._ack(message, ident)
            finally:
                self._active.discard(ident)
                self._finished += 1
                if not self._room.is_set():
                    self._room.set()
                if queue:
                    self._queued.put_nowait(lane)
                else:
                    del self._lanes[lane]
                    if self._stopping.is_set():
                        self._finish_if_drained()

    def _ack(self, message: RawMessage, ident: Ident) -> None:
        # The receive thread sends it: an acknowledgement costs the caller two
        # hand-overs of the GIL, which the loop, running every handler, cannot spare.
        self._acks.append(message)
        self._acked.add(ident)
        self._acked_order.append(ident)
        if len(self._acked_order) > _REMEMBER_ACKED:
            self._acked.discard(self._acked_order.popleft())

    def _send_acks(self, consumer: Consumer) -> None:
        if self._acks:
            consumer.acknowledge(self._acks)


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
