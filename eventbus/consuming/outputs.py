"""Effectively-once outputs: ids derived from the input's place, sent in the order the inputs were received."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..broker.client import MessageId, RawMessage, ident_of
from ..errors import EventBusError
from ..service.handler import PublishOptions
from ..topics import REPLY_TO

#: A sequence id is the input's entry, its index in its batch and the output's index in the attempt, in these bits
#: (63 in all: the id is a signed 64-bit number). The ledger is in the producer's name (see `producer_name`).
ENTRY_BITS, BATCH_BITS, OUTPUT_BITS = 39, 12, 12
MAX_OUTPUTS = 1 << OUTPUT_BITS
#: An input's place in its topic partition: ledger, entry, index in its batch (-1: not batched).
Position = tuple[int, int, int]


@dataclass(frozen=True)
class Slot:
    """One of `count` equal parts of a key_shared group's key hashes (0-65535), consumed by one member at a time; the
    runners of a member's slots share `limit`, the group's handlers at once (`Permit`)."""

    index: int
    count: int
    limit: asyncio.Semaphore | None = field(default=None, compare=False, repr=False)

    @property
    def hashes(self) -> tuple[int, int]:
        """Its first and last hash, both included."""
        width = 65536 // self.count
        return self.index * width, 65535 if self.index == self.count - 1 else (self.index + 1) * width - 1


class Permit:
    """A handler's place in its group's limit: held from its start until its first output must wait for its turn.

    Held through that wait, the limit could be spent on handlers all waiting for an earlier message that waits for
    a place: none would finish. Given back, every place is held by a handler that can go on. Not taken again once the
    turn came: the partition's later outputs wait for this handler, and in line for a place behind handlers that will
    wait for it, they stalled a chaos run's group (125 msg/s handled of 150 published; 7,283 left at the end).
    """

    __slots__ = ("_limit", "held")

    def __init__(self, limit: asyncio.Semaphore) -> None:
        self._limit = limit
        self.held = False

    async def take(self) -> None:
        await self._limit.acquire()
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self._limit.release()


class TooManyOutputs(EventBusError):
    """An effectively-once handler stored more outputs for one message than its ids have room for."""


def sequence_id(position: Position, output: int) -> int | None:
    """The sequence id of the `output`-th output of the input at `position`; None when the input's place does not fit
    (an entry past 2**39 or a batch past 4,096 messages: its outputs go at least once)."""
    _, entry, batch_index = position
    if output >= MAX_OUTPUTS:
        raise TooManyOutputs(
            f"an effectively-once handler stored more than {MAX_OUTPUTS:,} outputs for one message: publish them "
            "in fewer messages (a list in one payload), or set effectively_once=False on this subscription"
        )
    batch_index = max(batch_index, 0)
    if entry >= 1 << ENTRY_BITS or batch_index >= 1 << BATCH_BITS:
        return None
    return entry << (BATCH_BITS + OUTPUT_BITS) | batch_index << OUTPUT_BITS | output


def producer_name(group: str, partition: str, ledger: int) -> str:
    """The producer name every rerun of an input of this group, partition and ledger sends its outputs under.

    A ledger's entries only grow, so ids under one name grow in input order; the broker keeps the highest
    id per name and drops a resend at or below it.
    """
    return f"eventbus-once:{group}:{partition.split('://', 1)[-1]}:{ledger}"


def place(message: RawMessage) -> tuple[str, Position]:
    """The message's topic partition and its place there."""
    _, ledger, entry, batch_index = ident_of(message)
    return message.topic_name(), (ledger, entry, batch_index)


class PublishedLate(EventBusError):
    """An output was sent after its handler's attempt ended (a task the handler started and did not await)."""


class Turns:
    """The inputs of each partition not yet done, in input order: only the earliest may send outputs.

    Ids under one producer name must only grow (the broker drops an id at or below the highest it stored,
    silently: lost). Handlers of different keys run at once, so an input's outputs wait until every input
    received before it in its partition is done. An input abandoned (left unacknowledged for the broker to send
    again) keeps its place: nothing after it in its partition sends, as its rerun's ids would be below theirs.
    """

    def __init__(self) -> None:
        self._pending: dict[str, list[Position]] = {}
        self._waiting: dict[tuple[str, Position], asyncio.Future[None]] = {}
        self._abandoned: set[tuple[str, Position]] = set()

    def admit(self, partition: str, position: Position) -> None:
        """An input taken to be handled, in the order received (a redelivered earlier one goes in its place)."""
        bisect.insort(self._pending.setdefault(partition, []), position)

    def first(self, partition: str, position: Position) -> bool:
        pending = self._pending.get(partition)
        return pending is not None and pending[0] == position and (partition, position) not in self._abandoned

    def turn(self, partition: str, position: Position) -> Awaitable[None] | None:
        """None when the input may send now; else what to await until it may."""
        if self.first(partition, position):
            return None
        pending = self._pending.get(partition)
        if not pending or position not in pending:
            raise PublishedLate(
                "an output was published after its handler's attempt ended (a task it started and did not await): "
                "await every publish in the handler"
            )
        future = self._waiting.get((partition, position))
        if future is None:
            future = self._waiting[(partition, position)] = asyncio.get_running_loop().create_future()
        return asyncio.shield(future)

    def finish(self, partition: str, position: Position, *, abandoned: bool = False) -> None:
        """The input is done (`abandoned`: left for the broker to send again): the next may send."""
        if abandoned:
            self._abandoned.add((partition, position))
            return
        pending = self._pending.get(partition)
        if pending is None:
            return
        index = bisect.bisect_left(pending, position)
        if index < len(pending) and pending[index] == position:
            del pending[index]
        future = self._waiting.pop((partition, position), None)
        if future is not None and not future.done():
            future.cancel()
        if not pending:
            del self._pending[partition]
        elif index == 0:
            self._wake(partition, pending[0])

    def _wake(self, partition: str, position: Position) -> None:
        if (partition, position) in self._abandoned:
            return
        future = self._waiting.pop((partition, position), None)
        if future is not None and not future.done():
            future.set_result(None)


class OnceSender(Protocol):
    """What sends an output under a given producer name and sequence id (`publishing.once.OnceProducers`)."""

    async def enqueue_once(
        self, topic: str, name: str, sequence_id: int, data: bytes, content_type: str | None, options: PublishOptions
    ) -> asyncio.Future[MessageId] | None: ...

    async def send_plain(
        self, topic: str, data: bytes, content_type: str | None, options: PublishOptions
    ) -> MessageId: ...

    async def release(self, group: str, topic: str) -> None: ...


class Outputs:
    """One input's outputs across its attempts: each attempt numbers them from 0, so a rerun sends the same ids."""

    __slots__ = ("_turns", "_sender", "_partition", "_position", "_name", "_lock", "_permit", "count")

    def __init__(
        self, turns: Turns, sender: OnceSender, group: str, message: RawMessage, permit: Permit | None = None
    ) -> None:
        """`permit`: the handler's place in its group's limit, lent back while an output waits for its turn."""
        self._turns, self._sender, self._permit = turns, sender, permit
        self._partition, self._position = place(message)
        self._name = producer_name(group, self._partition, self._position[0])
        self._lock: asyncio.Lock | None = None
        #: Outputs sent in this attempt so far.
        self.count = 0

    def attempt(self) -> None:
        self.count = 0

    async def publish(self, topic: str, data: bytes, content_type: str | None, options: PublishOptions) -> MessageId:
        """Send once the input's turn came, under its derived name and id; a rerun's copy the broker drops comes back
        as a receipt with no place (`-1:-1:-1:-1`)."""
        if options.get("sequence_id") is not None:
            raise ValueError(
                "publish(sequence_id=...) in an effectively-once handler: the bus derives each output's id from its "
                "message; leave sequence_id out"
            )
        if REPLY_TO in (options.get("properties") or ()):
            # A request (`bus.request`): its rerun asks anew under a new correlation id and waits for that reply.
            return await self._sender.send_plain(topic, data, content_type, options)
        waiting = self._turns.turn(self._partition, self._position)
        if waiting is not None:
            if self._permit is not None:
                self._permit.give()
            await waiting
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # numbered and handed to the producer in call order, as the ids must grow
            sequence = sequence_id(self._position, self.count)
            self.count += 1
            if sequence is None:
                sent: Any = None
            else:
                sent = await self._sender.enqueue_once(topic, self._name, sequence, data, content_type, options)
        if sent is None:
            return await self._sender.send_plain(topic, data, content_type, options)
        message_id: MessageId = await sent
        return message_id

    def finish(self, handled: bool) -> None:
        self._turns.finish(self._partition, self._position, abandoned=not handled)
