"""An app's bus and worker on a test broker, recording what it publishes, handles and dead-letters, with waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..bus import EventBus
from ..observing.events import DeadLettered, Event, Handled, Outcome, Published
from ..registry import Router
from ..settings import Settings

E = TypeVar("E", Published, Handled, DeadLettered)
#: Events shown when a wait fails (the last ones).
_SHOWN = 20


class Recorder:
    """Keeps every event a bus reports, in order, and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.published: list[Published] = []
        self.handled: list[Handled] = []
        self.dead_letters: list[DeadLettered] = []
        self._changed = asyncio.Event()

    def record(self, event: Event) -> None:
        if isinstance(event, Published):
            self.published.append(event)
        elif isinstance(event, Handled):
            self.handled.append(event)
        else:
            self.dead_letters.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """Set at the next event."""
        return self._changed


class _Started:
    """`bus.run`'s task status: resolves a future once every subscription exists."""

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def started(self, value: None = None) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Harness:
    """A started `EventBus` for `routers`, its worker running in a task this harness owns, and what it did.

    >>> async with Harness(settings, [router]) as app:
    ...     await app.publish("orders", Order(id="o-1"), key="o-1")
    ...     [handled] = await app.wait_handled(topic="orders")

    It starts and stops in whatever task uses it (a pytest-asyncio fixture's set-up
    and teardown run in two): the worker runs in a task of its own, not in a task
    group of the caller's. `run=False` starts the bus only; `start_worker()` later.
    """

    def __init__(
        self, settings: Settings, routers: Sequence[Router], *, run: bool = True,
        dependency_overrides: Mapping[Callable[..., Any], Callable[..., Any]] | None = None,
    ) -> None:
        """`dependency_overrides` replace `Depends` providers: ``{get_db: fake_db}``."""
        self.recorder = Recorder()
        self.bus = EventBus(settings, routers, observer=self.recorder, dependency_overrides=dependency_overrides)
        #: `bus.publish`: publish as the app would.
        self.publish = self.bus.publish
        #: `bus.request`: ask a handler and wait for its reply, as the app would.
        self.request = self.bus.request
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def settings(self) -> Settings:
        return self.bus.settings

    @property
    def published(self) -> list[Published]:
        """Every message the app published that the broker confirmed (handlers' publishes included), in order."""
        return self.recorder.published

    @property
    def handled(self) -> list[Handled]:
        """Every handler attempt, in order, with its outcome."""
        return self.recorder.handled

    @property
    def dead_letters(self) -> list[DeadLettered]:
        """Every message the app dead-lettered (confirmed by the broker), with its reason."""
        return self.recorder.dead_letters

    async def __aenter__(self) -> Harness:
        await self.bus.start()
        try:
            if self._run:
                await self.start_worker()
        except BaseException:
            await self.bus.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start_worker(self) -> None:
        """Run the routers' handlers; returns once every subscription exists."""
        if self._task is not None:
            raise RuntimeError("the worker is already running")
        status = _Started()
        self._task = asyncio.create_task(self.bus.run(handle_signals=False, task_status=status))
        await asyncio.wait({status.future, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # raises why it stopped
            raise RuntimeError("the worker stopped before its subscriptions existed")

    async def stop(self) -> None:
        """Stop the worker (in-flight handlers finish), then close the bus; raises what stopped the worker, if anything did."""
        task, self._task = self._task, None
        try:
            if task is not None:
                self.bus.stop()
                await task
        finally:
            await self.bus.close()

    def topic(self, name: str) -> str:
        """The full name of a topic as this bus resolves it (its test namespace)."""
        return self.bus.settings.topic(name)

    def published_to(self, topic: str) -> list[Published]:
        """The confirmed publishes to `topic` (a short or a full name)."""
        full = self.topic(topic)
        return [p for p in self.published if p.topic == full]

    async def wait_handled(
        self,
        count: int = 1,
        *,
        topic: str | None = None,
        group: str | None = None,
        outcome: Outcome | None = "ok",
        where: Callable[[Handled], object] | None = None,
        timeout: float = 5.0,
    ) -> list[Handled]:
        """Wait until `count` handler attempts match (by default: handled successfully); returns the first `count`.

        Fails with `AssertionError` listing every attempt seen when `timeout` passes first,
        and at once when the worker stopped.
        """

        def matches(event: Handled) -> bool:
            return (
                (topic is None or event.topic == self.topic(topic))
                and (group is None or event.group == group)
                and (outcome is None or event.outcome == outcome)
                and (where is None or bool(where(event)))
            )

        what = _describe("handled message", count, topic=topic, group=group, outcome=outcome, where=where)
        return await self._wait(self.recorder.handled, matches, count, timeout, what)

    async def wait_dead_lettered(
        self,
        count: int = 1,
        *,
        topic: str | None = None,
        group: str | None = None,
        reason: str | None = None,
        where: Callable[[DeadLettered], object] | None = None,
        timeout: float = 5.0,
    ) -> list[DeadLettered]:
        """Wait until `count` dead letters match; returns the first `count`; fails like `wait_handled`."""

        def matches(event: DeadLettered) -> bool:
            return (
                (topic is None or event.topic == self.topic(topic))
                and (group is None or event.group == group)
                and (reason is None or event.reason == reason)
                and (where is None or bool(where(event)))
            )

        what = _describe("dead letter", count, topic=topic, group=group, reason=reason, where=where)
        return await self._wait(self.recorder.dead_letters, matches, count, timeout, what)

    async def wait_published(
        self,
        count: int = 1,
        *,
        topic: str | None = None,
        where: Callable[[Published], object] | None = None,
        timeout: float = 5.0,
    ) -> list[Published]:
        """Wait until the app has published `count` matching messages (a handler's follow-ups, say)."""

        def matches(event: Published) -> bool:
            return (topic is None or event.topic == self.topic(topic)) and (where is None or bool(where(event)))

        what = _describe("published message", count, topic=topic, where=where)
        return await self._wait(self.recorder.published, matches, count, timeout, what)

    async def _wait(
        self, events: list[E], matches: Callable[[E], bool], count: int, timeout: float, what: str
    ) -> list[E]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = [event for event in events if matches(event)]
            if len(found) >= count:
                return found[:count]
            task = self._task
            if task is not None and task.done():
                error = task.exception()
                raise AssertionError(f"the worker stopped ({error!r}) while waiting for {what}{_seen(events)}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"waited {timeout:g}s for {what}, found {len(found)}{_seen(events)}")
            changed = self.recorder.changed()
            waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(changed.wait())}
            if task is not None:
                waiters.add(task)
            done, pending = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                if waiter is not task:
                    waiter.cancel()


def _describe(noun: str, count: int, **filters: object) -> str:
    shown = ", ".join(
        f"{name}={'<predicate>' if callable(value) else repr(value)}" for name, value in filters.items() if value is not None
    )
    return f"{count} {noun}{'s' if count != 1 else ''}" + (f" ({shown})" if shown else "")


def _seen(events: Sequence[Event]) -> str:
    if not events:
        return "; nothing was seen"
    lines = [_line(event) for event in events[-_SHOWN:]]
    more = f" (the last {_SHOWN} of {len(events)})" if len(events) > _SHOWN else ""
    return f"; seen{more}:\n  " + "\n  ".join(lines)


def _line(event: Event) -> str:
    if isinstance(event, Handled):
        error = f" {type(event.error).__name__}: {event.error}" if event.error is not None else ""
        return f"{event.outcome:<15} {event.topic} group={event.group} payload={event.payload!r}{error}"
    if isinstance(event, DeadLettered):
        return f"dead-lettered   {event.topic} group={event.group} reason={event.reason} {event.error_type}: {event.error}"
    return f"published       {event.topic} key={event.key!r} payload={event.payload!r}"
