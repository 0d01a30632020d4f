"""The worker: every subscription's runner and the background tasks until a stop, then the drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Collection, Sequence
from typing import Protocol

import anyio
import anyio.abc

from ..broker.connect import Connection
from ..consuming.attempts import Sender
from ..consuming.outputs import OnceSender
from ..consuming.outputs import Slot
from ..consuming.presence import Presence
from ..consuming.runner import SubscriptionRunner
from ..consuming.slots import KeySlots
from ..errors import EventBusError
from ..observing.events import Observer
from ..observing.metrics import Metrics
from ..observing.probes import Probes
from ..observing.tracing import Tracing
from ..registry import Background, Subscription
from ..service.dependencies import AppScope
from ..service.handler import Publisher
from ..settings import Settings
from .lifetime import Exits, Lifetime

log = logging.getLogger("eventbus")

#: Subscribes a worker has in flight at once while it starts.
_SUBSCRIBING = 64
#: An effectively-once key_shared group's key slots: each consumed by one member at a time (a sticky range), so each
#: slot's outputs have one producer; a worker holds those no other holds, and takes over those a member leaves.
ONCE_SLOTS = 16


def runners_for(
    subs: Sequence[tuple[str, Subscription]], connection: Connection, settings: Settings, *, bus: Publisher,
    dead_letters: Sender, metrics: Metrics | None, tracing: Tracing | None, observer: Observer | None,
    app: AppScope | None = None, middleware: tuple[object, ...] = (), once: OnceSender | None = None,
    presence: Presence | None = None,
) -> list[Runner]:
    """A runner per (full topic, subscription), and one per retry topic of each group that dead-letters
    (where `eventbus dlq replay` sends its dead letters back). `app`: the worker's app-scoped dependencies;
    `middleware`: the bus's; `once`: the sender of effectively-once outputs (None: the broker does not deduplicate);
    `presence`: how an effectively-once key_shared group's members share its key slots (`KeySlots`)."""

    def runner(sub: Subscription, topic: str, replays_for: str | None = None) -> Runner:
        def make(slot: Slot | None = None, nudge: asyncio.Event | None = None) -> SubscriptionRunner:
            return SubscriptionRunner(
                sub, topic, connection, settings if slot is None else per_slot(settings), bus=bus,
                dead_letters=dead_letters, metrics=metrics, tracing=tracing, observer=observer, replays_for=replays_for,
                app=app, middleware=middleware, once=once, slot=slot, nudge=nudge,
            )

        if once is not None and sub.effectively_once and sub.subscription_type == "key_shared":
            counts = metrics.subscription(topic, sub.group) if metrics is not None else None
            return KeySlots(sub, topic, make, presence, ONCE_SLOTS, counts)
        return make()

    return [runner(sub, topic) for topic, sub in subs] + [
        runner(sub, sub.retry_topic(topic), topic) for topic, sub in subs if sub.dead_letter
    ]


def per_slot(settings: Settings) -> Settings:
    """A key slot's share of a subscription's bounds: a worker holding every slot holds about what one runner would.
    Each slot has `concurrency` worker tasks (measured: one each kept a chaos run's group at 73 msg/s, its handler
    waiting on a request between its outputs, behind the 134 msg/s published); the group's handlers at once on a
    member are `concurrency` across its slots (`outputs.Permit`)."""
    bounds = {
        name: max(10, getattr(settings, name) // ONCE_SLOTS)
        for name in ("consumer_receiver_queue_size", "consumer_max_in_flight", "consumer_max_in_flight_bytes")
    }
    return settings.model_copy(update=bounds)


class Runner(Protocol):
    """What the worker runs: a subscription's runner, or an effectively-once key_shared group's slots (`KeySlots`)."""

    @property
    def topic(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    def stop(self) -> None: ...
    async def close(self) -> None: ...


class Closing(Protocol):
    """Something the worker closes after its runners (`publishing.once.OnceProducers`)."""

    async def close(self) -> None: ...


class Awaiting(Protocol):
    """The requests a process waits on (`publishing.requester.Requester`): their topics, and when that changes."""

    changed: asyncio.Event

    def awaited(self) -> Collection[str]: ...


class Worker:
    """Opens its lifetime, runs the runners until `stop` is set; then drains them within `drain_timeout`, closes
    them, cancels the background tasks and closes its lifetime."""

    def __init__(
        self,
        runners: Sequence[Runner],
        background: Sequence[Background],
        bus: Publisher,
        stop: asyncio.Event,
        settings: Settings,
        metrics: Metrics | None = None,
        lifetime: Lifetime | None = None,
        requests: Awaiting | None = None,
        once: Closing | None = None,
        presence: Presence | None = None,
    ) -> None:
        """`/metrics`, `/livez` and `/readyz` are served when `settings.metrics_port` is set and there are metrics.
        `requests`: this process's requests waiting for replies: at a stop, the runners of the topics they wait on
        keep taking messages until nothing waits on them. `once`: the producers of the runners' effectively-once
        outputs, closed once the runners are; `presence`: the runners' key slots' (started before them, closed after)."""
        self._once, self._presence = once, presence
        self.runners = tuple(runners)
        self._awaited = requests.awaited if requests is not None else frozenset
        self._requests_changed = requests.changed if requests is not None else asyncio.Event()
        self._lifetime = lifetime if lifetime is not None else Lifetime()
        self._background = tuple(background)
        self._bus = bus
        self._stop = stop
        self._drain_timeout, self._exit_timeout = settings.shutdown_drain_timeout, settings.shutdown_exit_timeout
        self._failures: list[EventBusError] = []
        self.probes = None
        if settings.metrics_port is not None and metrics is not None:
            self.probes = Probes(
                metrics, self.ready, settings.metrics_host, settings.metrics_port, settings.liveness_stall_seconds
            )
        self._started = False

    @property
    def running(self) -> tuple[SubscriptionRunner, ...]:
        """Every subscription's runner, each key slot's of an effectively-once key_shared group."""
        return tuple(
            one for runner in self.runners
            for one in (runner.runners.values() if isinstance(runner, KeySlots) else (runner,))
            if isinstance(one, SubscriptionRunner)
        )

    def ready(self) -> bool:
        """Every subscription consuming (or standing by), and no stop begun: what `/readyz` answers."""
        return self._started and not self._stop.is_set() and all(runner.ready for runner in self.runners)

    def stop(self) -> None:
        """No new messages from now on (loop thread only): a handler finishing must not start another; except on
        a topic a request of this process waits on, which `_stop_when_unawaited` stops once nothing waits."""
        self._stop.set()
        self._stop_unawaited()

    def _stop_unawaited(self) -> bool:
        """Stop every runner no request waits on; True when none is left taking messages."""
        keep = self._awaited()
        for runner in self.runners:
            if not keep or runner.topic not in keep:
                runner.stop()
        return not keep or not any(runner.topic in keep for runner in self.runners)

    async def _stop_when_unawaited(self) -> None:
        """A handler waiting on a request to a subscription of this same worker would wait for nothing (measured:
        every graceful stop of a worker that asks itself took the request timeout, 31 s, and handled its requests
        again after the restart): that subscription keeps taking messages until no request waits on it."""
        while True:
            self._requests_changed.clear()
            if self._stop_unawaited():
                return
            await self._requests_changed.wait()

    async def run(self, *, handle_signals: bool | None, task_status: anyio.abc.TaskStatus[None]) -> None:
        """`handle_signals` None: when on the main thread (only there can a loop take signals)."""
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        if self.probes is None:
            await self._run(handle_signals, task_status)
            return
        # From before the first subscribe until after the drain; a task of its own, not a task
        # group's, so what run() raises reaches its caller as it is.
        serving = asyncio.ensure_future(self.probes.serve())
        try:
            await self._run(handle_signals, task_status)
        finally:
            serving.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(serving, return_exceptions=True)

    async def _run(self, handle_signals: bool, task_status: anyio.abc.TaskStatus[None]) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            self._install_signals(loop)
        try:
            async with Exits(self._exit_timeout) as lifetime:
                await self._lifetime.open(lifetime, self._bus)
                await self._consume(task_status)
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if self._failures:
            raise self._failures[0]

    async def _consume(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start the runners and the background tasks; after a stop, drain the runners, close them, then cancel
        the background tasks (a handler still running may need what one of them holds)."""
        try:
            if self._presence is not None:
                await self._presence.start()
            await self._start_runners()
            self._started = True
            task_status.started()
            async with anyio.create_task_group() as background:
                for func in self._background:
                    background.start_soon(func, self._bus)
                await self._drain_after_stop()
                background.cancel_scope.cancel()
        finally:
            for runner in self.runners:
                runner.stop()
            with anyio.CancelScope(shield=True):  # at once: a group of effectively-once slots is 32 consumers
                await asyncio.gather(*(runner.close() for runner in self.runners))
            with anyio.CancelScope(shield=True):
                if self._once is not None:
                    await self._once.close()
                if self._presence is not None:
                    await self._presence.close()

    async def _start_runners(self) -> None:
        """Subscribe every runner, `_SUBSCRIBING` at a time; raise the first failure (in the runners' order).

        One at a time, 300 subscriptions took 10 s to start on Apache Pulsar and 1,000 took 24 s on the embedded
        broker (`python -m bench --subscriptions`): each subscribe waits for a broker round trip or two.
        """
        limit = asyncio.Semaphore(_SUBSCRIBING)

        async def start(runner: Runner) -> None:
            async with limit:
                await runner.start()

        outcomes = await asyncio.gather(*(start(runner) for runner in self.runners), return_exceptions=True)
        failure = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
        if failure is not None:
            raise failure

    async def _drain_after_stop(self) -> None:
        async with anyio.create_task_group() as tg:
            done = [anyio.Event() for _ in self.runners]
            for runner, finished in zip(self.runners, done):
                tg.start_soon(self._run_one, runner, finished)
            await self._stop.wait()
            log.info("stopping: draining in-flight handlers (up to %.0fs)", self._drain_timeout)
            self.stop()
            tg.start_soon(self._stop_when_unawaited)
            with anyio.move_on_after(self._drain_timeout):
                for finished in done:
                    await finished.wait()
            if not all(e.is_set() for e in done):
                busy = sum(r.in_flight for r in self.runners)
                log.warning("drain timeout: cancelling handlers; up to %d message(s) will be redelivered", busy)
                tg.cancel_scope.cancel()

    async def _run_one(self, runner: Runner, finished: anyio.Event) -> None:
        try:
            await runner.run()
        except EventBusError as exc:
            # The runner logged why, or the broker refused it for good: the others drain, then run() raises it.
            self._failures.append(exc)
            self.stop()
        finally:
            finished.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_signal(sig: signal.Signals) -> None:
            if self._stop.is_set():
                log.warning("second %s: exiting now", sig.name)
                logging.shutdown()
                os._exit(128 + sig.value)
            log.info("received %s: shutting down (send it again to exit at once)", sig.name)
            self.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
