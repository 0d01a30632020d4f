"""The event bus: one connection, its producers, and the worker that runs the registered handlers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, NoReturn, Unpack

import anyio
import anyio.abc

from .broker.client import MessageId
from .broker.connect import Connection, connect
from .consuming.presence import Presence
from .consuming.runner import RunningSubscription
from .context import CURRENT, caller, tracked
from .errors import ConfigError
from .observing.events import Observer
from .observing.metrics import Metrics
from .observing.tracing import Tracing
from .publishing.once import once_sender
from .publishing.producers import Producers
from .publishing.requester import Requester
from .publishing.sending import Publishing, sending_for
from .registry import Lifespan, Router, Subscription, declared_schemas, default_router, lifespan_of, subscriptions_of
from .running.lifetime import Lifetime
from .running.worker import Worker, runners_for
from .service.dependencies import Provider
from .service.handler import BatchOptions, Publisher, PublishOptions
from .service.middleware import checked
from .settings import Settings

_NOT_STARTED = "the bus is not started: use `async with EventBus() as bus:`"
_BATCH_OPTIONS = frozenset(BatchOptions.__annotations__)
_PUBLISH_OPTIONS = frozenset(PublishOptions.__annotations__)


def _reject(options: Mapping[str, object], known: frozenset[str], method: str) -> NoReturn:
    unknown = ", ".join(sorted(set(options) - known))
    raise TypeError(f"{method}() got unexpected keyword argument(s) {unknown}: it takes {', '.join(sorted(known))}")


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
        lifespan: Callable[..., Any] | None = None,
        dependency_overrides: Mapping[Provider, Provider] | None = None,
        middleware: Sequence[object] = (),
    ) -> None:
        """`tracer_provider`: an OpenTelemetry TracerProvider (default: the global one, if set); `observer` is told
        of every confirmed publish, handler attempt and dead letter (the test kit's). `lifespan`: entered by `run()`
        before the routers' (see `Router.lifespan`); `middleware`: around every attempt (outside the routers') and
        every publish; `dependency_overrides` replace `Depends` providers when `run()` makes them (for tests)."""
        self._middleware = checked(middleware, "EventBus(middleware=...)")
        self.settings = settings if settings is not None else Settings()
        self._lifespans: list[Lifespan] = [lifespan_of(lifespan, "EventBus(lifespan=...)")] if lifespan else []
        self.dependency_overrides: dict[Provider, Provider] = dict(dependency_overrides or {})
        self._tracer_provider, self._observer = tracer_provider, observer
        self._tracing: Tracing | None = None
        self.routers = list(routers) if routers is not None else [default_router]
        self._publishing: Publishing | None = None  # chosen at start: plain or instrumented
        self._requester: Requester | None = None  # made at start; subscribes to its reply topic on the first request
        self._connection: Connection | None = None
        self._producers: Producers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # the loop's thread: stop() from another goes through the loop
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
        return self._worker.running if self._worker is not None else ()

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
        connection = await connect(self.settings)
        self._connection = connection
        self._tracing = Tracing.for_provider(self._tracer_provider)
        schemas, registry = declared_schemas(self.routers, self.settings.topic), connection.profile.schema_registry
        self._producers = Producers(connection.client, self.settings, connection.bridge, self.metrics, schemas, registry)
        self._requester = Requester(connection, self.settings, self.publish)
        self._publishing = sending_for(
            self._producers, self.settings, self.routers, self._tracing, self._observer, self._middleware
        )

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
        if self._requester is not None:
            requester, self._requester = self._requester, None
            await requester.close()
        if self._producers is not None:
            await self._producers.close()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    # -- publishing -----------------------------------------------------------------

    def publish(self, topic: str, payload: Any, **options: Unpack[PublishOptions]) -> Coroutine[Any, Any, MessageId]:
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
        if options and not _PUBLISH_OPTIONS.issuperset(options):
            _reject(options, _PUBLISH_OPTIONS, "publish")
        publishing = self._publishing
        if publishing is None:
            raise RuntimeError(_NOT_STARTED)
        coroutine = publishing.publish(topic, payload, options, where)
        if CURRENT.get() is not None:
            tracked(coroutine, "publish", topic, where)
        return coroutine

    def publish_batch(
        self, topic: str, payloads: Iterable[Any], **options: Unpack[BatchOptions]
    ) -> Coroutine[Any, Any, list[MessageId]]:
        """Publish many events at once; awaited, returns their ids in order.

        Every payload is encoded before the first is sent. When some are not
        confirmed, raises `PublishBatchError` naming each failure by index.
        """
        where = caller()
        if options and not _BATCH_OPTIONS.issuperset(options):
            _reject(options, _BATCH_OPTIONS, "publish_batch")
        publishing = self._publishing
        if publishing is None:
            raise RuntimeError(_NOT_STARTED)
        coroutine = publishing.publish_batch(topic, payloads, options, where)
        if CURRENT.get() is not None:
            tracked(coroutine, "publish_batch", topic, where)
        return coroutine

    async def request(
        self, topic: str, payload: Any, *, key: str | bytes | None = None, timeout: float = 10.0,
        response_type: Any = None, properties: Mapping[str, str] | None = None,
    ) -> Any:
        """Publish a request; return its handler's reply, decoded as `response_type` (default: the JSON value).

        >>> quote = await bus.request("pricing", basket, response_type=Quote, timeout=5)

        A request is an ordinary message (retried, ordered per key, dead-lettered). Raises `RequestFailed` when
        its handler gave up on it, `RequestTimeout` when no reply came within `timeout`."""
        if self._requester is None:
            raise RuntimeError(_NOT_STARTED)
        return await self._requester.request(
            topic, payload, key=key, timeout=timeout, response_type=Any if response_type is None else response_type,
            properties=properties,
        )

    @property
    def late_replies(self) -> int:
        """Replies dropped because their request had timed out (or was not this bus's)."""
        return self._requester.late if self._requester is not None else 0

    # -- consuming ------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, Subscription]]:
        """Every registered subscription with its full topic name; rejects duplicates."""
        return subscriptions_of(self.routers, self.settings.topic)

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

        First it enters the lifespans (the bus's, then each router's) and makes the app-scoped
        dependencies; one that raises ends it with `StartupFailed` before anything is consumed.
        On stop it takes no more messages, lets running handlers finish within
        `shutdown_drain_timeout`, acknowledges them and closes the consumers; then it cancels
        the background tasks, closes the app-scoped dependencies and exits the lifespans, in reverse.
        Messages received but not handled stay unacknowledged and are redelivered.
        A subscription that dies of something unexpected is logged with its
        traceback, the others drain, and `run()` raises `SubscriptionFailed`.
        """
        connection, producers, requests = self._connection, self._producers, self._requester
        if connection is None or producers is None or requests is None:
            raise RuntimeError(_NOT_STARTED)
        if producers.closed:
            raise RuntimeError("the bus is closed: open a new EventBus to run handlers")
        subs = self.subscriptions()
        background = [func for router in self.routers for func in router.background]
        if not subs and not background:
            raise ConfigError("no handlers are registered: import a module that uses @subscribe")
        lifetime = Lifetime.of(self._lifespans, self.routers, subs, self.dependency_overrides)
        once = await once_sender(self.settings, [sub for _, sub in subs], producers, connection.profile.lite)
        presence = Presence.in_namespace(connection.client, self.settings) if once is not None else None
        runners = runners_for(
            subs, connection, self.settings, bus=self, dead_letters=producers, metrics=self.metrics, once=once,
            tracing=self._tracing, observer=self._observer, app=lifetime.app, middleware=self._middleware, presence=presence,
        )
        parts = (self.settings, self.metrics, lifetime, requests, once, presence)
        self._worker = Worker(runners, background, self, self._stop, *parts)
        self._run_done = asyncio.Event()
        try:
            await self._worker.run(handle_signals=handle_signals, task_status=task_status)
        finally:
            self._stop = asyncio.Event()
            self._run_done.set()
            self._run_done = None
            self._worker = None
