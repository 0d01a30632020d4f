"""A subscription's worker tasks: each takes the next ready message, or batch, from the lanes, handles it, finishes it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Hashable

from ..broker.client import IdKey, RawMessage
from .intake import Intake
from .lanes import Lanes

Taken = tuple[Hashable, RawMessage, IdKey]
#: One attempt at a batch: (its messages, the attempt's number, finish(position, acknowledge)) -> the backoff
#: before the unfinished ones are tried again, or None.
HandleBatch = Callable[[list[RawMessage], int, Callable[[int, bool], None]], Awaitable[float | None]]


class Dispatch:
    """Hands ready lanes' messages to the worker tasks; a worker with nothing to take waits in `idle` until `wake`.

    `finished` is set once nothing more will be handed out; `stopping` once no batch should wait to fill;
    `after` runs after each message is finished (the runner's check for the end of a drain).
    """

    def __init__(
        self, lanes: Lanes[RawMessage, IdKey], intake: Intake, finished: asyncio.Event, stopping: asyncio.Event,
        after: Callable[[], None],
    ) -> None:
        self._lanes, self._intake, self._finished, self._stopping, self._after = lanes, intake, finished, stopping, after
        self.idle: list[asyncio.Future[None]] = []  # workers waiting for a ready lane
        #: Failed messages of batches waiting out their backoff: (due, order, the messages, their next attempt).
        self._retries: list[tuple[float, int, list[Taken], int]] = []
        self._order = itertools.count()

    def wake(self, count: int) -> None:
        idle = self.idle
        while idle and count > 0:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def one_at_a_time(self, handle: Callable[[RawMessage], Awaitable[bool]]) -> None:
        """A worker: take a message, handle it, finish it; until finished."""
        lanes, intake = self._lanes, self._intake
        acks, loop = intake.acks, asyncio.get_running_loop()
        while True:
            taken = lanes.take()
            if taken is None:
                if self._finished.is_set():
                    return
                waiter = loop.create_future()
                self.idle.append(waiter)
                await waiter
                continue
            lane, message, ident = taken
            acknowledged = False
            try:
                acknowledged = await handle(message)
                if acknowledged:
                    acks.append(message)
            finally:
                lanes.finish(lane, ident, acknowledged)
                intake.finish(1, message.length())
                self._after()

    async def in_batches(self, handle: HandleBatch, max_messages: int, max_wait: float) -> None:
        """A worker: take up to `max_messages` (one per lane: a key's next waits for its last), waiting at most
        `max_wait` seconds after the first for more, or a retry that is due; handle them together, finishing each
        as it is done; put the failed ones back as a retry due after their backoff; until finished."""
        while True:
            job = await self._next_batch(max_messages, max_wait)
            if job is None:
                return
            taken, attempt = job
            done = [False] * len(taken)

            def finish(position: int, acknowledged: bool, taken: list[Taken] = taken, done: list[bool] = done) -> None:
                done[position] = True
                lane, message, ident = taken[position]
                if acknowledged:
                    self._intake.acks.append(message)
                if self._lanes.finish(lane, ident, acknowledged):
                    self.wake(1)
                self._intake.finish(1, message.length())
                self._after()

            delay: float | None = None
            try:
                delay = await handle([message for _, message, _ in taken], attempt, finish)
            finally:
                left = [position for position, finished in enumerate(done) if not finished]
                if delay is not None and left:
                    self._retry_later([taken[p] for p in left], attempt + 1, delay)
                else:
                    for position in left:  # cancelled, or a bug: redelivered
                        finish(position, False)

    def _retry_later(self, taken: list[Taken], attempt: int, delay: float) -> None:
        """The failed messages of a batch, tried again together once `delay` has passed; their lanes stay busy."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        heapq.heappush(self._retries, (due, next(self._order), taken, attempt))
        loop.call_at(due, self.wake, 1)

    def _due_retry(self) -> tuple[list[Taken], int] | None:
        retries = self._retries
        if retries and retries[0][0] <= asyncio.get_running_loop().time():
            _, _, taken, attempt = heapq.heappop(retries)
            return taken, attempt
        return None

    async def _next_batch(self, max_messages: int, max_wait: float) -> tuple[list[Taken], int] | None:
        """A retry that is due, or new messages (attempt 1); None once finished."""
        while True:
            due = self._due_retry()
            if due is not None:
                return due
            taken = await self._fill(max_messages, max_wait)
            if taken:
                return taken, 1
            if self._finished.is_set():
                return None

    async def _fill(self, max_messages: int, max_wait: float) -> list[Taken]:
        """New messages; none when finished, or when a retry fell due before the first."""
        lanes, loop = self._lanes, asyncio.get_running_loop()
        taken: list[Taken] = []
        deadline = 0.0
        while len(taken) < max_messages:
            found = lanes.take()
            if found is not None:
                if not taken:
                    deadline = loop.time() + max_wait
                taken.append(found)
                continue
            if self._finished.is_set() or (taken and (self._stopping.is_set() or loop.time() >= deadline)):
                break
            if not taken and self._retries and self._retries[0][0] <= loop.time():
                break
            waiter = loop.create_future()
            self.idle.append(waiter)
            await asyncio.wait({waiter}, timeout=deadline - loop.time() if taken else None)
            if not waiter.done():
                waiter.cancel()  # a wake skips it
        return taken
