"""A subscription's intake: pulls batches from the client's queue within the in-flight bound, hands them to the
lanes, acknowledges; when the queue is empty it waits on the client's callback, with no thread and no poll."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..broker.client import Consumer, ConsumerClosed, IdKey, RawMessage, id_key
from ..settings import Settings

log = logging.getLogger("eventbus")

#: Messages pulled per turn of the event loop at most.
_HANDOFF = 256


@dataclass(frozen=True)
class Bounds:
    """What a subscription holds: at most `messages` in flight, whose payloads pass `bytes` by one message at most,
    and the client's queue of `receiver_queue` messages beside them."""

    messages: int
    bytes: int
    receiver_queue: int

    @classmethod
    def of(cls, settings: Settings) -> Bounds:
        return cls(
            settings.consumer_max_in_flight, settings.consumer_max_in_flight_bytes, settings.consumer_receiver_queue_size
        )

    def oversized(self, topic: str, size: int) -> str:
        fits = max(1, self.bytes // size)
        return (
            f"a message of {size:,} bytes on {topic}: the client's queue of {self.receiver_queue} messages may hold "
            f"{self.receiver_queue * size / 2**20:,.0f} MiB beside the {self.bytes / 2**20:,.0f} MiB in flight "
            f"(EVENTBUS_CONSUMER_MAX_IN_FLIGHT_BYTES); set EVENTBUS_CONSUMER_RECEIVER_QUEUE_SIZE to {fits} or less "
            "to keep it within that"
        )


class Intake:
    """Runs `run` on the event loop: a receive that does not wait (the client's queue) never blocks it.

    Pulling on the loop instead of in a receive thread of its own: two threads taking turns on the GIL per
    message cost the worker about a third of its rate (an acknowledgement or a receive in one thread
    waited for the other to let go).
    """

    def __init__(
        self, consumer: Consumer, bounds: Bounds, deliver: Callable[[list[RawMessage]], None],
        begun: Callable[[IdKey], bool],
    ) -> None:
        """`deliver(batch)` takes each batch; after `drain`, `begun(id)` says which messages the intake still takes."""
        self._consumer = consumer
        self._limit = bounds.messages
        self._budget = bounds.bytes
        self._bounds = bounds
        #: Payload bytes received and not yet finished.
        self.bytes = 0
        #: A payload this large makes the client's queue, full, hold more than the budget: said once.
        self._warn_above = bounds.bytes // bounds.receiver_queue
        self._deliver = deliver
        self._begun = begun
        self.received = 0
        self.finished = 0
        #: Messages to acknowledge (sent each turn: one call into the client for all of them).
        self.acks: collections.deque[RawMessage] = collections.deque()
        #: Set when there is room again (a finish) or a stop: what a full intake waits on.
        self._room: asyncio.Future[None] | None = None
        #: The client's pending receive, when its queue was empty (`Consumer.receive_later`).
        self._next: asyncio.Future[RawMessage] | None = None
        self._draining = False

    @property
    def in_flight(self) -> int:
        """Messages received and not yet finished."""
        return self.received - self.finished

    def finish(self, count: int = 1, size: int = 0) -> None:
        """`count` messages of `size` payload bytes in all are finished (handled, dropped as copies or left)."""
        self.finished += count
        self.bytes -= size
        if self._next is not None and self.acks:
            self._consumer.acknowledge(self.acks)  # the intake waits on an empty queue: nobody else sends them
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def drain(self) -> None:
        """Take only the rest of begun batches from now on, then end."""
        self._draining = True
        if self._next is not None:
            self._next.cancel()  # a receive waiting on an empty queue: nothing begun comes through it
        self.finish(0)

    def send_acks(self) -> None:
        """Acknowledge what is queued; an ack that does not reach the broker means a redelivery."""
        if self.acks:
            self._consumer.acknowledge(self.acks)

    async def run(self) -> None:
        """Pull until `drain`, then the rest of begun batches."""
        consumer, deliver, limit = self._consumer, self._deliver, self._limit
        loop = asyncio.get_running_loop()
        while True:
            self.send_acks()
            if self._draining:
                self._take_rest()
                return
            free = limit - (self.received - self.finished)
            if free <= 0 or self.bytes >= self._budget:
                self._room = loop.create_future()
                await self._room
                continue
            try:
                # What the client holds, up to the budget's room: never waits.
                batch, size = consumer.receive_sized(min(free, _HANDOFF), 0, self._budget - self.bytes)
                if not batch:
                    batch, size = await self._wait()
            except ConsumerClosed:
                return
            if batch:
                self.received += len(batch)
                self._count_bytes(batch, size)
                deliver(batch)
                await asyncio.sleep(0)  # the workers take the batch before the next is pulled

    async def _wait(self) -> tuple[list[RawMessage], int]:
        """The next message from the client's callback ([] when a stop came first: `drain` cancels the wait).

        Idle, a thread per subscription blocking in a receive of 100 ms cost two threads and 0.3 % of a core
        each (`python -m bench --subscriptions`: 300 subscriptions, 605 threads, a whole core).
        """
        self._next = self._consumer.receive_later()
        try:
            message = await self._next
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._draining and not (task is not None and task.cancelling()):
                return [], 0  # what it would still bring begins a batch: left for the broker
            raise
        finally:
            self._next = None
        return [message], message.length()

    def _count_bytes(self, batch: list[RawMessage], size: int) -> None:
        self.bytes += size
        if size > self._warn_above:  # no message passes it unless all of them together do
            largest = max(m.length() for m in batch)
            if largest > self._warn_above:
                self._warn_above = 1 << 62
                log.warning(self._bounds.oversized(batch[0].topic_name(), largest))

    def _take_rest(self) -> None:
        """After a stop: the messages of begun batches still in the client's queue (a batch arrives whole)."""
        begun = self._begun
        while True:
            try:
                batch = self._consumer.receive(_HANDOFF, 0)
            except ConsumerClosed:
                return
            rest = list(itertools.takewhile(lambda m: begun(id_key(m)), batch))
            if rest:
                self.received += len(rest)
                self._count_bytes(rest, sum(m.length() for m in rest))
                self._deliver(rest)
            if len(rest) < len(batch) or not batch:
                return  # the rest of the queue is left unacknowledged: the broker sends it again
