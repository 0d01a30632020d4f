"""Lanes of received messages: per-key order, duplicates, in-flight ids and the stop rule; on the loop, no I/O."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any, Generic, Literal, TypeVar

M = TypeVar("M")
I = TypeVar("I", bound=Hashable)
#: What `Lanes.admit` did with a message: queued it, or left it unhandled, and why.
Admission = Literal["queued", "running", "acknowledged", "left_at_stop"]


class RecentIds(Generic[I]):
    """The last `size` ids added, for membership tests (about 100 bytes each)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: set[I] = set()
        self._order: collections.deque[I] = collections.deque()

    def __contains__(self, ident: object) -> bool:
        return ident in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> collections.abc.Iterator[I]:
        return iter(self._order)

    def add(self, ident: I) -> None:
        if ident in self._ids:
            return
        self._ids.add(ident)
        self._order.append(ident)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())


class Lanes(Generic[M, I]):
    """Messages waiting to be handled, one lane per key (or per message), each lane's one at a time, in order.

    A lane is in `_queues` while it has a message queued or running, and in `ready` while it has one
    queued and none running. A message's id is `active` from `admit` to `finish`; a copy of an active or
    lately acknowledged id (a broker may send one again: after a reconnect, pulsar-lite's replays) is
    refused. `stop` applies the begun-batch rule (see there); `batch_of` names an id's batch.
    """

    def __init__(self, batch_of: Callable[[I], Hashable], remember: int = 100_000) -> None:
        self.ready: collections.deque[Hashable] = collections.deque()
        self._queues: dict[Hashable, collections.deque[tuple[M, I]]] = {}
        self._active: set[I] = set()
        self._recent: RecentIds[I] = RecentIds(remember)
        self._batch_of = batch_of
        self._begun: frozenset[Hashable] | None = None  # set by stop()
        self._closed: set[Hashable] = set()

    @property
    def stopping(self) -> bool:
        return self._begun is not None

    @property
    def empty(self) -> bool:
        """Nothing queued or running."""
        return not self._queues

    @property
    def waiting(self) -> int:
        """Messages queued, not running."""
        return sum(map(len, self._queues.values()))

    @property
    def active(self) -> int:
        """Messages queued or running."""
        return len(self._active)

    def admit(self, message: M, ident: I, lane: Hashable) -> Admission:
        """Queue a received message on its lane, unless it is a copy, or a stop leaves it for the broker."""
        if ident in self._active:
            return "running"
        if ident in self._recent:
            return "acknowledged"  # acknowledged before, yet here again: acknowledge it once more
        if self._begun is not None and (self._batch_of(ident) not in self._begun or lane in self._closed):
            self._closed.add(lane)  # left for the broker to send again, and its lane's later ones
            return "left_at_stop"
        self._active.add(ident)
        queue = self._queues.get(lane)
        if queue is None:
            self._queues[lane] = collections.deque(((message, ident),))
            self.ready.append(lane)
        else:
            queue.append((message, ident))
        return "queued"

    def take(self) -> tuple[Hashable, M, I] | None:
        """The next message to handle and its lane (running until `finish`), or None when no lane is ready."""
        if not self.ready:
            return None
        lane = self.ready.popleft()
        message, ident = self._queues[lane].popleft()
        return lane, message, ident

    def finish(self, lane: Hashable, ident: I, acknowledged: bool) -> bool:
        """A taken message is done (`acknowledged`: remember its id); True when its lane is ready again."""
        self._active.discard(ident)
        if acknowledged:
            self._recent.add(ident)
        queue = self._queues[lane]
        if queue:
            self.ready.append(lane)
            return True
        del self._queues[lane]
        return False

    def stop(self, keep_queued: bool = False) -> int:
        """Take no new batches: returns how many queued messages are left for the broker to send again.

        The client acknowledges a batch to the broker only once every message of it is acknowledged, and
        forgets a partial one when the consumer closes: the broker then sends the whole batch again, the
        messages handled before the stop included. So the rest of every batch begun (a message of it
        running or acknowledged) is handled too, and everything else queued is left unacknowledged. A
        lane keeps its order: behind a message left, the lane's later ones are left too. `keep_queued`: every
        queued message counts as begun (effectively-once outputs go in the order received: none may be skipped).
        """
        if self._begun is not None:
            return 0
        queued = {ident for queue in self._queues.values() for _, ident in queue}
        started = self._active if keep_queued else self._active - queued  # a running one is out of its queue
        # Every acknowledged one: a batch's rest may still be in the client's queue, or on another partition's.
        begun = set(map(self._batch_of, started)) | set(map(self._batch_of, self._recent))
        self._begun = frozenset(begun)
        ready = set(self.ready)
        left = 0
        for lane, queue in list(self._queues.items()):
            keep = 0
            for _, ident in queue:
                if self._batch_of(ident) not in begun:
                    break
                keep += 1
            if keep < len(queue):
                self._closed.add(lane)
                for _ in range(len(queue) - keep):
                    self._active.discard(queue.pop()[1])
                    left += 1
            if not queue and lane in ready:  # nothing queued and none running
                del self._queues[lane]
        self.ready = collections.deque(lane for lane in self.ready if lane in self._queues)
        return left

    def begun(self, ident: I) -> bool:
        """After `stop`: whether the message's batch was begun (the intake takes the rest of those)."""
        return self._begun is not None and self._batch_of(ident) in self._begun


class OrderedLanes(Lanes[M, I]):
    """Lanes that hand out the ready message received earliest (by its place in its topic), not the lane ready first.

    For effectively-once outputs, which go in the order received: a worker waiting to send blocks until every
    earlier message is done, so the earliest must never wait for a worker. With the lanes' own order it could: a
    key's next message becomes ready when its last finishes, behind a later key's that is taken first and waits for
    it (concurrency 1 stopped there for good). Taking the earliest ready one, the earliest unfinished message of a
    topic partition is always running or next. A stop leaves none of them (`stop(keep_queued=True)`): one left would
    come back below the ids sent after it.
    """

    def __init__(self, batch_of: Callable[[I], Hashable], remember: int, place: Callable[[M], Any]) -> None:
        super().__init__(batch_of, remember)
        self._place = place
        self._places: dict[I, Any] = {}

    def admit(self, message: M, ident: I, lane: Hashable) -> Admission:
        admission = super().admit(message, ident, lane)
        if admission == "queued":
            self._places[ident] = self._place(message)
        return admission

    def take(self) -> tuple[Hashable, M, I] | None:
        if not self.ready:
            return None
        queues, places = self._queues, self._places
        lane = min(self.ready, key=lambda ready: places[queues[ready][0][1]])
        self.ready.remove(lane)
        message, ident = queues[lane].popleft()
        return lane, message, ident

    def finish(self, lane: Hashable, ident: I, acknowledged: bool) -> bool:
        self._places.pop(ident, None)
        return super().finish(lane, ident, acknowledged)

    def stop(self, keep_queued: bool = False) -> int:
        left = super().stop(keep_queued)
        if left:
            queued = {ident for queue in self._queues.values() for _, ident in queue}
            self._places = {ident: place for ident, place in self._places.items() if ident in queued or ident in self._active}
        return left


class MixedKeys(Generic[I]):
    """Notices batches that hold messages of different keys (other producers' default batchers, Java's and Go's).

    A key_shared subscription hands a whole batch to the member its first key belongs to, so the other keys'
    order across members cannot hold for such a batch. Fed each message in the order received; cheap unless
    the key changed from the message before (then one `entry_of`).
    """

    def __init__(self, entry_of: Callable[[I], Hashable]) -> None:
        self._entry_of = entry_of
        self._key: object = None
        self._entry: Hashable = None
        self._counted: Hashable = None
        #: Batches seen holding more than one key.
        self.count = 0

    def seen(self, ident: I, key: object) -> bool:
        """Whether this message is the first sign of a batch not seen mixed before (then counted)."""
        if key == self._key:
            return False
        entry = self._entry_of(ident)
        mixed = entry == self._entry and entry != self._counted
        self._key, self._entry = key, entry
        if mixed:
            self._counted = entry
            self.count += 1
        return mixed
