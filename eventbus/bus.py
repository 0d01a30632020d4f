"""The event bus: one connection, its producers, and the worker that runs the registered handlers."""

from __future__ import annotations

import asyncio
import threading
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc

from .codec import encode
from .connect import Connection, connect
from .context import CURRENT, Caller, caller, tracked, watch_unawaited
from .consumer import RunningSubscription, SubscriptionRunner
from .client import MessageId, build_message, id_text
from .errors import ConfigError, PublishBatchError
from .events import Observer, Published
from .handler import Publisher
from .metrics import Metrics
from .probes import Probes
from .producers import Producers
from .registry import Publication, Router, Subscription, default_router
from .settings import Settings
from .tracing import Tracing
from .worker import Worker

_NOT_STARTED = "the bus is not started: use `async with EventBus() as bus:`"


class EventBus(Publisher):
    """Publish events and run handlers on Pulsar.

    >>> async with EventBus() as bus:
    ...     await bus.publish("orders", Order(id="o-1"), key="o-1")
    ...     await bus.run()          # handle until SIGINT/SIGTERM or bus.stop()

    With no broker URL configured it starts (or joins) the embedded broker.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        routers: Sequence[Router] | None = None,
        *,
        tracer_provider: Any = None,
        observer: Observer | None = None,
    ) -> None:
        """`tracer_provider`: an OpenTelemetry TracerProvider to trace into (default: the global one, if set).

        `observer` is told of every confirmed publish, handler attempt and dead letter (the test kit uses it).
        """
        self.settings = settings if settings is not None else Settings()
        self._tracer_provider = tracer_provider
        self._tracing: Tracing | None = None
        self._observer = observer
        self.routers = list(routers) if routers is not None else [default_router]
        # Full topic name -> what the app declared it publishes there (Router.publisher).
        self._publications: dict[str, Publication] = {}
        # Whether publish takes the instrumented path (tracing, an observer, declared payload types).
        self._instrumented = False
        self._connection: Connection | None = None
        self._producers: Producers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._stop = asyncio.Event()
        self._worker: Worker | None = None
        self._run_done: asyncio.Event | None = None
        #: The bus's Prometheus metrics (`metrics.registry`), when EVENTBUS_METRICS or EVENTBUS_METRICS_PORT is set.
        self.metrics = Metrics() if self.settings.collects_metrics else None

    def __repr__(self) -> str:
        where = self.url or ("embedded" if self.settings.uses_embedded else self.settings.url)
        return f"EventBus(url={where!r}, tenant={self.settings.tenant!r}, namespace={self.settings.namespace!r})"

    @property
    def url(self) -> str:
        """The broker's service URL once started ("" before)."""
        return self._connection.url if self._connection is not None else ""

    @property
    def server_version(self) -> str:
        """What the broker calls itself in the protocol handshake ("Pulsar-Lite-..." for the embedded one)."""
        return self._connection.profile.server_version if self._connection is not None else ""

    @property
    def running(self) -> tuple[RunningSubscription, ...]:
        """The subscriptions `run()` is running, with their state (empty when it is not running)."""
        return self._worker.runners if self._worker is not None else ()

    @property
    def probe_port(self) -> int | None:
        """The port `/metrics`, `/livez` and `/readyz` answer on while `run()` runs (None: not served)."""
        worker = self._worker
        return worker.probes.port if worker is not None and worker.probes is not None else None

    @property
    def producer_topics(self) -> list[str]:
        """Full names of the topics this bus has a producer for (created on first publish)."""
        return self._producers.topics if self._producers is not None else []

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect: start or join the embedded broker, or check the configured one answers."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        watch_unawaited(EventBus._publish.__code__)
        watch_unawaited(EventBus._publish_many.__code__)
        connection = await connect(self.settings)
        self._connection = connection
        self._tracing = Tracing.for_provider(self._tracer_provider)
        self._publications = {
            self.settings.topic(p.topic): p for router in self.routers for p in router.publications
        }
        self._instrumented = bool(self._tracing or self._observer or self._publications)
        self._producers = Producers(connection.client, self.settings, connection.bridge, self.metrics)

    async def close(self) -> None:
        """Stop a running `run()` and let it drain, close the producers, then the client.

        A publish made from now on raises `PublishError` (BusClosed, not stored);
        every publish already accepted finishes with its true outcome first.
        """
        if self._producers is not None:
            self._producers.closed = True
        if self._run_done is not None:
            # run() still going (another task): its consumers drain before the client goes.
            self.stop()
            await self._run_done.wait()
        if self._producers is not None:
            await self._producers.close()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    # -- publishing -----------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | bytes | None = None,
        properties: Mapping[str, str] | None = None,
        deliver_after: timedelta | float | None = None,
        event_time: datetime | int | None = None,
        sequence_id: int | None = None,
    ) -> Coroutine[Any, Any, MessageId]:
        """Publish one event; awaited, returns its id once the broker has stored it.

        >>> await bus.publish("orders", {"id": "o-1"}, key="o-1")

        `key` orders the messages of one key on ordered subscriptions (bytes: a
        key that is not UTF-8). `deliver_after` (seconds or a timedelta) holds the
        message back on Apache Pulsar's shared and key_shared subscriptions.
        `sequence_id`, with a stable `EVENTBUS_PRODUCER_NAME` and deduplication on
        the namespace, makes a resend of the same id a no-op at the broker.

        Raises `TypeError` before sending when the payload cannot be encoded,
        and `PublishError` when the broker did not confirm it. Not awaited, nothing is sent: inside a
        handler that fails the attempt, elsewhere it is logged at ERROR naming the caller.
        """
        where = caller()
        coroutine = self._publish(topic, payload, key, properties, deliver_after, event_time, sequence_id, where)
        if CURRENT.get() is not None:
            tracked(coroutine, "publish", topic, where)
        return coroutine

    async def _publish(
        self,
        topic: str,
        payload: Any,
        key: str | bytes | None,
        properties: Mapping[str, str] | None,
        deliver_after: timedelta | float | None,
        event_time: datetime | int | None,
        sequence_id: int | None,
        _caller: Caller,  # read when it is never awaited (context.watch_unawaited)
    ) -> MessageId:
        if self._instrumented:
            return await self._publish_instrumented(
                topic, payload, key=key, properties=properties, deliver_after=deliver_after, event_time=event_time,
                sequence_id=sequence_id,
            )
        data, content_type = encode(payload)
        message, size = build_message(
            data, content_type, key=key, properties=properties, deliver_after=deliver_after, event_time=event_time,
            sequence_id=sequence_id,
        )
        producers = self._producers
        if producers is None:
            raise RuntimeError(_NOT_STARTED)
        producer = producers.ready.get(topic) or await producers.get(topic)
        if not producer.reserve_nowait():  # no coroutine of its own: this runs per message
            await producer.reserve()
        return await producer.enqueue(message, key, size, deliver_after is None)

    async def _publish_instrumented(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | bytes | None,
        properties: Mapping[str, str] | None,
        deliver_after: timedelta | float | None,
        event_time: datetime | int | None,
        sequence_id: int | None,
    ) -> MessageId:
        """`publish` with a declared payload type checked, in a PRODUCER span, told to the observer."""
        producers = self._producers
        if producers is None:
            raise RuntimeError(_NOT_STARTED)
        full = self.settings.topic(topic)
        publication = self._publications.get(full)
        if publication is not None:
            publication.check(payload)
        data, content_type = encode(payload)
        with self._send_span(full, properties) as (span, traced):
            message, size = build_message(
                data, content_type, key=key, properties=traced, deliver_after=deliver_after, event_time=event_time,
                sequence_id=sequence_id,
            )
            producer = await producers.get(topic)
            message_id = await producer.send(message, key, size, batchable=deliver_after is None)
            if span is not None:
                span.set_attribute("messaging.message.id", id_text(message_id))
        if self._observer is not None:
            self._observer.record(Published(full, key, payload, dict(traced or {}), data, message_id))
        return message_id

    def _send_span(
        self, topic: str, properties: Mapping[str, str] | None, **attributes: Any
    ) -> AbstractContextManager[tuple[Any, Mapping[str, str] | None]]:
        """A PRODUCER span and the properties carrying its context; without tracing, none and the properties."""
        if self._tracing is None:
            return nullcontext((None, properties))
        return self._tracing.send(topic, properties, **attributes)

    def publish_batch(
        self,
        topic: str,
        payloads: Iterable[Any],
        *,
        key: str | bytes | None = None,
        properties: Mapping[str, str] | None = None,
        deliver_after: timedelta | float | None = None,
        event_time: datetime | int | None = None,
    ) -> Coroutine[Any, Any, list[MessageId]]:
        """Publish many events at once; awaited, returns their ids in order.

        Every payload is encoded before the first is sent. When some are not
        confirmed, raises `PublishBatchError` naming each failure by index.
        """
        where = caller()
        coroutine = self._publish_many(topic, payloads, key, properties, deliver_after, event_time, where)
        if CURRENT.get() is not None:
            tracked(coroutine, "publish_batch", topic, where)
        return coroutine

    async def _publish_many(
        self,
        topic: str,
        payloads: Iterable[Any],
        key: str | bytes | None,
        properties: Mapping[str, str] | None,
        deliver_after: timedelta | float | None,
        event_time: datetime | int | None,
        _caller: Caller,  # read when it is never awaited (context.watch_unawaited)
    ) -> list[MessageId]:
        if self._instrumented:
            payloads = list(payloads)
            full = self.settings.topic(topic)
            publication = self._publications.get(full)
            if publication is not None:
                for index, payload in enumerate(payloads):
                    try:
                        publication.check(payload)
                    except TypeError as exc:
                        raise TypeError(f"payload #{index}: {exc}") from None
            with self._send_span(full, properties, **{"messaging.batch.message_count": len(payloads)}) as (_, traced):
                ids = await self._publish_batch(topic, payloads, key, traced, deliver_after, event_time)
            if self._observer is not None:
                for payload, message_id in zip(payloads, ids):
                    self._observer.record(Published(full, key, payload, dict(traced or {}), encode(payload)[0], message_id))
            return ids
        return await self._publish_batch(topic, payloads, key, properties, deliver_after, event_time)

    async def _publish_batch(
        self,
        topic: str,
        payloads: Iterable[Any],
        key: str | bytes | None,
        properties: Mapping[str, str] | None,
        deliver_after: timedelta | float | None,
        event_time: datetime | int | None,
    ) -> list[MessageId]:
        messages = []
        for index, payload in enumerate(payloads):
            try:
                data, content_type = encode(payload)
            except TypeError as exc:
                raise TypeError(f"payload #{index}: {exc}") from None
            messages.append(
                build_message(
                    data, content_type, key=key, properties=properties, deliver_after=deliver_after, event_time=event_time
                )
            )
        if self._producers is None:
            raise RuntimeError(_NOT_STARTED)
        producer = await self._producers.get(topic)
        futures: list[asyncio.Future[MessageId] | None] = []
        failures: dict[int, BaseException] = {}
        for index, (message, size) in enumerate(messages):
            try:
                futures.append(await producer.submit(message, key, size, batchable=deliver_after is None))
            except Exception as exc:
                failures[index] = exc
                futures.append(None)
        ids: list[Any] = []
        for index, future in enumerate(futures):
            if future is None:
                ids.append(None)
                continue
            try:
                ids.append(await future)
            except Exception as exc:
                failures[index] = exc
                ids.append(None)
        if failures:
            raise PublishBatchError(producer.topic, failures, ids)
        return ids

    # -- consuming ------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, Subscription]]:
        """Every registered subscription with its full topic name; rejects duplicates."""
        seen: dict[tuple[str, str], Subscription] = {}
        out = []
        for router in self.routers:
            for sub in router.subscriptions:
                full = self.settings.topic(sub.topic)
                other = seen.get((full, sub.group))
                if other is not None:
                    raise ConfigError(
                        f"group {sub.group!r} on {full} has two handlers: {other.name} and {sub.name}"
                    )
                seen[(full, sub.group)] = sub
                out.append((full, sub))
        return out

    def stop(self) -> None:
        """Ask `run()` to stop: no new messages; in-flight handlers finish and are acknowledged.

        Safe from any thread, a sync handler's included; a stop asked before `run()` starts makes it return at once.
        """
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._stop_now)
        else:
            self._stop_now()

    def _stop_now(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.stop()

    async def run(
        self, *, handle_signals: bool | None = None, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every registered handler until `stop()` or SIGINT/SIGTERM.

        ``await task_group.start(bus.run)`` returns once every subscription exists.

        On stop it takes no more messages, lets running handlers finish within
        `shutdown_drain_timeout`, acknowledges them and closes the consumers.
        Messages received but not handled stay unacknowledged and are redelivered.
        A subscription that dies of something unexpected is logged with its
        traceback, the others drain, and `run()` raises `SubscriptionFailed`.
        """
        connection, producers = self._connection, self._producers
        if connection is None or producers is None:
            raise RuntimeError(_NOT_STARTED)
        if producers.closed:
            raise RuntimeError("the bus is closed: open a new EventBus to run handlers")
        subs = self.subscriptions()
        background = [func for router in self.routers for func in router.background]
        if not subs and not background:
            raise ConfigError("no handlers are registered: import a module that uses @subscribe")
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        def runner(sub: Subscription, topic: str, replays_for: str | None = None) -> SubscriptionRunner:
            return SubscriptionRunner(
                sub, topic, connection, self.settings, bus=self, dead_letters=producers, metrics=self.metrics,
                tracing=self._tracing, observer=self._observer, replays_for=replays_for,
            )

        # Each group that dead-letters also consumes its retry topic, where `eventbus dlq replay` sends them back.
        runners = [runner(sub, topic) for topic, sub in subs] + [
            runner(sub, sub.retry_topic(topic), topic) for topic, sub in subs if sub.dead_letter
        ]
        settings = self.settings
        probes = None
        if settings.metrics_port is not None and self.metrics is not None:
            probes = Probes(
                self.metrics, lambda: self._worker is not None and self._worker.ready(), settings.metrics_host,
                settings.metrics_port, settings.liveness_stall_seconds,
            )
        self._worker = Worker(runners, background, self, self._stop, settings.shutdown_drain_timeout, probes)
        self._run_done = asyncio.Event()
        try:
            await self._worker.run(handle_signals=handle_signals, task_status=task_status)
        finally:
            self._stop = asyncio.Event()
            self._run_done.set()
            self._run_done = None
            self._worker = None
