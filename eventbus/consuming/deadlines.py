"""Handler timeouts: a deadline slot per worker task, set per call, enforced by a subscription's watchdog while calls run."""

from __future__ import annotations

import asyncio

import anyio


class HandlerTimeout(Exception):
    """A handler ran past its subscription's `timeout`."""


class Slot:
    """One task's deadline: 0 while it runs no handler call."""

    __slots__ = ("task", "deadline", "timed_out", "_deadlines")

    def __init__(self, task: asyncio.Task[object] | None, deadlines: Deadlines) -> None:
        self.task = task
        self.deadline = 0.0
        self.timed_out = False
        self._deadlines = deadlines

    def start(self) -> None:
        """A call begins: its deadline is the subscription's timeout from now (a parked watchdog woken)."""
        deadlines = self._deadlines
        self.deadline = deadlines.now() + deadlines.timeout
        if deadlines.parked is not None and not deadlines.parked.done():
            deadlines.parked.set_result(None)

    def expired(self) -> HandlerTimeout:
        """After the watchdog cancelled this task's call: the error the call fails with (the cancel undone)."""
        self.timed_out = False
        if self.task is not None:
            self.task.uncancel()
        return HandlerTimeout(f"the handler did not finish within {self._deadlines.timeout:g}s (subscribe(timeout=...))")


class Deadlines:
    """The slots of a subscription's worker tasks; `watchdog` cancels a task whose call is past its deadline.

    A slot per task, set per call: a cancel scope per message cost 5-7 us, more than the rest of the
    dispatch, and a deadline per call keyed by `asyncio.current_task()` a coroutine frame and a lookup.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._slots: list[Slot] = []
        #: Set while the watchdog waits for a call to begin (no call runs): `Slot.start` wakes it.
        self.parked: asyncio.Future[None] | None = None

    def slot(self) -> Slot:
        """The calling task's slot (once per task)."""
        slot = Slot(asyncio.current_task(), self)
        self._slots.append(slot)
        return slot

    def now(self) -> float:
        return self._loop.time()

    async def watchdog(self, finished: asyncio.Event) -> None:
        """Cancel each call that runs past its deadline, until `finished` is set; parked while no call runs.

        Ticking once a second whatever ran, idle subscriptions' watchdogs were most of what 300 of them cost
        a worker doing nothing (`python -m bench --subscriptions`).
        """
        ended = asyncio.ensure_future(finished.wait())
        try:
            while not finished.is_set():
                if not any(slot.deadline for slot in self._slots):
                    self.parked = self._loop.create_future()
                    await asyncio.wait((self.parked, ended), return_when=asyncio.FIRST_COMPLETED)
                    self.parked = None
                    continue
                if await sleep_unless(finished, min(self.timeout / 4, 1.0)):
                    return
                self._expire(self._loop.time())
        finally:
            ended.cancel()

    def _expire(self, now: float) -> None:
        for slot in self._slots:
            if 0 < slot.deadline <= now and not slot.timed_out and slot.task is not None:
                slot.timed_out = True
                slot.task.cancel()


async def sleep_unless(event: asyncio.Event, delay: float) -> bool:
    """Sleep `delay` seconds; True (at once) if `event` is set first."""
    with anyio.move_on_after(delay):
        await event.wait()
        return True
    return False


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return once any of `events` is set, or after `timeout` seconds."""
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            for event in events:
                tg.start_soon(_cancel_when_set, event, tg.cancel_scope)


async def _cancel_when_set(event: asyncio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
