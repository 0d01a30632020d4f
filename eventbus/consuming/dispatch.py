"""A subscription's worker tasks: each takes the next ready message, or batch, from the lanes, handles it, finishes it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

from ..broker.client import IdKey, RawMessage
from .intake import Intake
from .lanes import Lanes

Taken = tuple[Hashable, RawMessage, IdKey]


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
                intake.finish()
                self._after()

    async def in_batches(
        self, handle: Callable[[list[RawMessage]], Awaitable[list[bool]]], max_messages: int, max_wait: float
    ) -> None:
        """A worker: take up to `max_messages` (one per lane: a key's next waits for its last), waiting at most
        `max_wait` seconds after the first for more; handle them together, finish each; until finished."""
        lanes, intake = self._lanes, self._intake
        while True:
            taken = await self._fill(max_messages, max_wait)
            if not taken:
                return
            acknowledged = [False] * len(taken)
            try:
                acknowledged = await handle([message for _, message, _ in taken])
                intake.acks.extend(message for (_, message, _), ok in zip(taken, acknowledged) if ok)
            finally:
                for (lane, _, ident), ok in zip(taken, acknowledged):
                    lanes.finish(lane, ident, ok)
                intake.finish(len(taken))
                self._after()

    async def _fill(self, max_messages: int, max_wait: float) -> list[Taken]:
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
            waiter = loop.create_future()
            self.idle.append(waiter)
            await asyncio.wait({waiter}, timeout=deadline - loop.time() if taken else None)
            if not waiter.done():
                waiter.cancel()  # a wake skips it
        return taken
