"""A subscription's receive thread: takes batches within the in-flight bound, hands them to the loop, acknowledges."""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable

from .bridge import LoopBridge
from .client import Consumer, ConsumerClosed, IdKey, RawMessage, id_key

#: How long the receive thread blocks before it looks at the stop flag again: a stop waits up to this
#: long. Idle, the example app's 8 consumers used 0.9 % of a core at 100 ms and 2.9 % at 25 ms.
_POLL_MS = 100
#: Messages the receive thread hands the loop per wake-up at most.
_HANDOFF = 256


class Intake:
    """Runs `run` in a thread of its own (the client's receive blocks); the loop calls the rest.

    `received` is written by the thread and `finished` by the loop, so their difference is safe to read anywhere.
    """

    def __init__(
        self, consumer: Consumer, bridge: LoopBridge, limit: int, deliver: Callable[[list[RawMessage]], None],
        begun: Callable[[IdKey], bool],
    ) -> None:
        """`deliver(batch)` runs on the loop; after `drain`, `begun(ident)` says which messages the thread still takes."""
        self._consumer = consumer
        self._bridge = bridge
        self._limit = limit
        self._deliver = deliver
        self._begun = begun
        self.received = 0
        self.finished = 0
        #: Messages to acknowledge: the thread sends them (from the loop an acknowledgement costs two
        #: hand-overs of the GIL, which the loop, running every handler, cannot spare).
        self.acks: collections.deque[RawMessage] = collections.deque()
        self._room = threading.Event()
        self._draining = False

    @property
    def in_flight(self) -> int:
        """Messages received and not yet finished."""
        return self.received - self.finished

    def finish(self, count: int = 1) -> None:
        """`count` messages are finished (handled, dropped as copies or left): room for more. Loop only."""
        self.finished += count
        if not self._room.is_set():
            self._room.set()

    def drain(self) -> None:
        """Take only the rest of begun batches from now on, then end. Loop only."""
        self._draining = True
        self._room.set()

    def send_acks(self) -> None:
        """Acknowledge what is queued; an ack that does not reach the broker means a redelivery."""
        if self.acks:
            self._consumer.acknowledge(self.acks)

    def run(self) -> None:
        """The thread: receive until `drain`, then the rest of begun batches."""
        consumer, call, deliver, room, limit = self._consumer, self._bridge.call, self._deliver, self._room, self._limit
        while True:
            self.send_acks()
            if self._draining:
                self._receive_rest()
                return
            free = limit - (self.received - self.finished)
            if free <= 0:
                room.clear()
                if self.received - self.finished >= limit:
                    room.wait(_POLL_MS / 1000)
                continue
            try:
                batch = consumer.receive(min(free, _HANDOFF), _POLL_MS)
            except ConsumerClosed:
                return
            if batch:
                self.received += len(batch)
                call(deliver, batch)

    def _receive_rest(self) -> None:
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
                self._bridge.call(self._deliver, rest)
            if len(rest) < len(batch) or not batch:
                return  # the rest of the queue is left unacknowledged: the broker sends it again
