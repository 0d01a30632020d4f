"""An effectively-once key_shared group on this member: a runner per key slot of its share, moved as members change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio

from ..errors import SubscriptionFailed
from ..observing.metrics import SubscriptionCounts
from ..registry import Subscription
from .deadlines import wait_any
from .outputs import Slot
from .presence import Presence
from .runner import SubscriptionRunner

#: Makes the runner of a slot; the event wakes it from standing by (the slot's holder said it let it go).
MakeRunner = Callable[[Slot, asyncio.Event], SubscriptionRunner]


class KeySlots:
    """Runs the slots of its share (`Presence.share`): a slot that leaves the share is stopped gracefully (its
    handlers finish, its outputs' producers close, then its consumer), and one that joins it is subscribed once no
    other member says it holds it. Each slot keeps its own order of outputs (`consuming.outputs`)."""

    def __init__(
        self, sub: Subscription, topic: str, make: MakeRunner, presence: Presence | None, count: int,
        counts: SubscriptionCounts | None = None,
    ) -> None:
        self.sub, self.topic, self._make, self._presence, self._count = sub, topic, make, presence, count
        self._key = (topic, sub.group)
        self._changed = presence.join(self._key, self._held) if presence is not None else asyncio.Event()
        #: The runners of this member's slots, by slot index: consuming, standing by, or being let go.
        self.runners: dict[int, SubscriptionRunner] = {}
        self._nudges: dict[int, asyncio.Event] = {}
        #: The group's handlers at once on this member, across its slots (else each slot would run `concurrency`).
        self._limit = asyncio.Semaphore(sub.concurrency)
        self._stopping = asyncio.Event()
        self.failure: BaseException | None = None
        if counts is not None:  # the slots share the group's counts: their sum
            counts.in_flight = lambda: self.in_flight

    @property
    def in_flight(self) -> int:
        return sum(runner.in_flight for runner in self.runners.values())

    @property
    def ready(self) -> bool:
        return all(runner.ready for runner in self.runners.values())

    def _held(self) -> list[int]:
        return [slot for slot, runner in self.runners.items() if runner.state == "consuming"]

    def _wanted(self) -> tuple[frozenset[int], frozenset[int]]:
        """This member's share, and the slots of it to ask for now: those no other member says it holds (each
        refused ask is a WARN and an ERROR line of the client's: 3,309 refusals in a 600 s chaos run, 88 in one worker)."""
        if self._presence is None:
            return frozenset(range(self._count)), frozenset(range(self._count))
        share = self._presence.share(self._key, self._count)
        return share, share - self._presence.held_elsewhere(self._key)

    def _runner(self, slot: int) -> SubscriptionRunner:
        nudge = self._nudges[slot] = asyncio.Event()
        runner = self.runners[slot] = self._make(Slot(slot, self._count, self._limit), nudge)
        return runner

    async def start(self) -> None:
        """Subscribe the slots of this member's share once; raises what cannot cure itself (as a runner's start)."""
        await asyncio.gather(*(self._runner(slot).start() for slot in sorted(self._wanted()[1])))

    async def run(self) -> None:
        """Run the share's slots until `stop()`, following the share as members come and go."""
        try:
            async with anyio.create_task_group() as tg:
                for slot, runner in self.runners.items():
                    tg.start_soon(self._run_slot, slot, runner)
                while not self._stopping.is_set():
                    self._changed.clear()
                    self._follow(tg)
                    await wait_any(self._changed, self._stopping)
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()
        if self.failure is not None:
            raise self.failure

    def _follow(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the share's free slots not running, stop those out of it, and wake those standing by."""
        share, free = self._wanted()
        for slot in free - self.runners.keys():
            tg.start_soon(self._run_slot, slot, self._runner(slot))
        for slot, runner in self.runners.items():
            if slot not in share:
                runner.stop()
            else:
                self._nudges[slot].set()

    async def _run_slot(self, slot: int, runner: SubscriptionRunner) -> None:
        try:
            await runner.run()
        except SubscriptionFailed as exc:
            if self.failure is None:
                self.failure = exc
            self.stop()
        finally:
            if self.runners.get(slot) is runner:
                del self.runners[slot]
                del self._nudges[slot]
            if self._presence is not None:
                self._presence.beat_soon()  # its next holder takes it now
            self._changed.set()  # back in the share (a change undone)? started again

    def stop(self) -> None:
        """Stop every slot: handlers finish and are acknowledged, then each closes (as a runner's stop)."""
        self._stopping.set()
        for runner in self.runners.values():
            runner.stop()

    async def close(self) -> None:
        await asyncio.gather(*(runner.close() for runner in list(self.runners.values())))

