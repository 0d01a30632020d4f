"""The event bus: one Pulsar client, its producers, and the subscriptions it runs."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import pulsar
import pulsar.asyncio

from .bridge import LoopBridge
from .codec import encode
from .embedded import EmbeddedBroker
from .errors import (
    PULSAR_ERRORS, AuthenticationFailed, BrokerUnavailable, ConfigError, PublishBatchError, PublishError,
    SubscriptionFailed,
)
from .handshake import HandshakeRejected, handshake
from .message import MessageId
from .producers import TopicProducer, build_message, create_producer
from .registry import Router, Subscription, default_router
from .settings import Settings, broker_addresses

log = logging.getLogger("eventbus")


class EventBus:
    """Publish events and run handlers on Pulsar.

    >>> async with EventBus() as bus:
    ...     await bus.publish("orders", Order(id="o-1"), key="o-1")
    ...     await bus.run()          # handle until SIGINT/SIGTERM or bus.stop()

    With no broker URL configured it starts (or joins) the embedded broker.
    """

    def __init__(self, settings: Settings | None = None, routers: Sequence[Router] | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.routers = list(routers) if routers is not None else [default_router]
        self._client: pulsar.asyncio.Client | None = None
        self._broker: EmbeddedBroker | None = None
        self._bridge: LoopBridge | None = None
        self._producers: dict[str, asyncio.Task[TopicProducer]] = {}
        self._ready: dict[str, TopicProducer] = {}  # by the name publish was given
        self._stop = asyncio.Event()
        self._runners: list[Any] = []
        self._run_done: asyncio.Event | None = None
        self._closed = False
        self.url = ""
        #: What the broker calls itself in the protocol handshake ("Pulsar-Lite-..." for the embedded one).
        self.server_version = ""

    def __repr__(self) -> str:
        where = self.url or ("embedded" if self.settings.embedded else self.settings.url)
        return f"EventBus(url={where!r}, tenant={self.settings.tenant!r}, namespace={self.settings.namespace!r})"

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect: start or join the embedded broker, or check the configured one answers."""
        settings = self.settings
        try:
            token = settings.jwt()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._bridge = LoopBridge(asyncio.get_running_loop())
        self._closed = False
        if settings.embedded:
            self._broker = await anyio.to_thread.run_sync(EmbeddedBroker.acquire, settings.data_dir)
            self.url = self._broker.url
        else:
            self.url = settings.url
        self.server_version = await _check_broker(self.url, token, settings)
        options: dict[str, Any] = dict(
            operation_timeout_seconds=settings.operation_timeout_seconds,
            connection_timeout_ms=settings.connection_timeout_ms,
            logger=_client_logger(settings.log_level),
        )
        if token:
            options["authentication"] = pulsar.AuthenticationToken(token)
        if settings.tls_trust_certs_file is not None:
            options["tls_trust_certs_file_path"] = str(settings.tls_trust_certs_file)
        if self.url.startswith("pulsar+ssl://"):
            options["tls_validate_hostname"] = settings.tls_validate_hostname
        self._client = pulsar.asyncio.Client(self.url, **options)

    async def close(self) -> None:
        """Close the producers, then the client; release the embedded broker.

        A publish made from now on raises `PublishError` (BusClosed, not stored);
        every publish already accepted finishes with its true outcome first.
        """
        self._closed = True
        if self._run_done is not None:
            # run() still going (another task): its consumers drain before the client goes.
            self.stop()
            await self._run_done.wait()
        # Short and full names share a task: close each producer once.
        producers = list({id(t): t for t in self._producers.values()}.values())
        self._producers = {}
        self._ready = {}

        async def close_one(task: asyncio.Task[TopicProducer]) -> None:
            try:
                producer = await task
                await producer.close()
            except Exception as exc:
                log.warning("closing producer: %s", exc)

        await asyncio.gather(*(close_one(task) for task in producers))
        self._runners = []
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close()
            except Exception as exc:
                log.warning("closing client: %s", exc)
            del client
            gc.collect()  # release the client's objects here, not in interpreter teardown
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await anyio.to_thread.run_sync(broker.release)

    # -- publishing -----------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        properties: Mapping[str, str] | None = None,
        deliver_after: timedelta | float | None = None,
        event_time: datetime | int | None = None,
        sequence_id: int | None = None,
    ) -> MessageId:
        """Publish one event; returns its id once the broker has stored it.

        >>> await bus.publish("orders", {"id": "o-1"}, key="o-1")

        `deliver_after` (seconds or a timedelta) holds the message back on Apache
        Pulsar's shared and key_shared subscriptions. `sequence_id`, with a stable
        `EVENTBUS_PRODUCER_NAME` and deduplication on the namespace, makes a resend
        of the same id a no-op at the broker.

        Raises `TypeError` before sending when the payload cannot be encoded,
        and `PublishError` when the broker did not confirm it.
        """
        data, content_type = encode(payload)
        message, size = build_message(
            data, content_type, key=key, properties=properties, deliver_after=deliver_after, event_time=event_time,
            sequence_id=sequence_id,
        )
        producer = self._ready.get(topic) or await self._producer(topic)
        if not producer.reserve_nowait():  # no coroutine of its own: this runs per message
            await producer.reserve()
        return await producer.enqueue(message, key, size, deliver_after is None)

    async def publish_batch(
        self,
        topic: str,
        payloads: Iterable[Any],
        *,
        key: str | None = None,
        properties: Mapping[str, str] | None = None,
        deliver_after: timedelta | float | None = None,
        event_time: datetime | int | None = None,
    ) -> list[MessageId]:
        """Publish many events at once; returns their ids in order.

        Every payload is encoded before the first is sent. When some are not
        confirmed, raises `PublishBatchError` naming each failure by index.
        """
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
        producer = await self._producer(topic)
        futures = []
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

    async def _send_raw(
        self, topic: str, data: bytes, *, key: str | bytes | None, properties: Mapping[str, str]
    ) -> MessageId:
        producer = await self._producer(topic)
        message, size = build_message(data, None, key=key, properties=properties)
        return await producer.send(message, key, size)

    async def _producer(self, topic: str) -> TopicProducer:
        task = self._producers.get(topic)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            if self._closed:
                raise PublishError(topic, "BusClosed", maybe_stored=False)
            if self._client is None:
                raise RuntimeError("the bus is not started: use `async with EventBus() as bus:`")
            full = self.settings.topic(topic)
            task = self._producers.get(full)
            if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
                task = asyncio.ensure_future(create_producer(self._client, full, self.settings, self._bridge))
                self._producers[full] = task
            self._producers[topic] = task
        try:
            producer = await asyncio.shield(task)
        except PULSAR_ERRORS as exc:
            raise _broker_error(f"cannot create a producer for {topic}", exc) from None
        if self._producers.get(topic) is task:  # not closed meanwhile
            self._ready[topic] = producer
        return producer

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

    @property
    def lite_broker(self) -> bool:
        """True on pulsar-lite (the embedded broker), whose gaps the bus works around."""
        return self.server_version.startswith("Pulsar-Lite")

    def stop(self) -> None:
        """Ask `run()` to stop: no new messages; in-flight handlers finish and are acknowledged."""
        self._stop.set()
        # At once, not when run() next wakes: a handler finishing meanwhile must not start another.
        for runner in self._runners:
            runner.stop()

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
        from .consumer import SubscriptionRunner

        if self._client is None:
            raise RuntimeError("the bus is not started: use `async with EventBus() as bus:`")
        subs = self.subscriptions()
        background = [func for router in self.routers for func in router.background]
        if not subs and not background:
            raise ConfigError("no handlers are registered: import a module that uses @subscribe")
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        runners = [SubscriptionRunner(self, sub, topic) for topic, sub in subs]
        self._runners = runners
        self._failures: list[BaseException] = []
        self._run_done = asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals:
            self._install_signals(loop)
        try:
            for runner in runners:
                if not runner.may_consume():
                    continue  # another process consumes it on the embedded broker; run() stands by
                try:
                    await runner.subscribe()
                except PULSAR_ERRORS as exc:
                    if not _transient(exc):
                        raise _broker_error(f"cannot subscribe {runner.sub.group!r} to {runner.topic}", exc) from None
                    # The broker is there (the handshake said so) but busy, restarting, or
                    # holding the subscription for another consumer: keep trying in run().
                    if "ConsumerBusy" not in str(exc):  # a standby member: the runner says so
                        log.warning(
                            "cannot subscribe %s group=%s yet (%s): retrying until it works or the worker stops",
                            runner.topic, runner.sub.group, exc,
                        )
            task_status.started()
            async with anyio.create_task_group() as tg:
                done = [anyio.Event() for _ in runners]
                for runner, finished in zip(runners, done):
                    tg.start_soon(self._run_runner, runner, finished)
                async with anyio.create_task_group() as bg:
                    for func in background:
                        bg.start_soon(func, self)
                    await self._stop.wait()
                    bg.cancel_scope.cancel()
                log.info("stopping: draining in-flight handlers (up to %.0fs)", self.settings.shutdown_drain_timeout)
                for runner in runners:
                    runner.stop()
                with anyio.move_on_after(self.settings.shutdown_drain_timeout):
                    for finished in done:
                        await finished.wait()
                if not all(e.is_set() for e in done):
                    busy = sum(r.in_flight for r in runners)
                    log.warning("drain timeout: cancelling handlers; up to %d message(s) will be redelivered", busy)
                    tg.cancel_scope.cancel()
        finally:
            for runner in runners:
                runner.stop()
                with anyio.CancelScope(shield=True):
                    await runner._close()
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            self._stop = asyncio.Event()
            self._run_done.set()
            self._run_done = None
        if self._failures:
            raise self._failures[0]

    async def _run_runner(self, runner: Any, finished: anyio.Event) -> None:
        try:
            await runner.run()
        except SubscriptionFailed as exc:
            # The runner logged why; the others drain, then run() raises it.
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


def _client_logger(level: str) -> Any:
    """The C++ client's logger.

    Handed a Python logger, the client calls into Python for every debug line,
    five per message, each taking the GIL from its I/O thread: that alone cost
    more than half of the publish path. So only at DEBUG do its logs go through
    Python logging ("eventbus.pulsar"); otherwise its warnings and errors go
    straight to stderr, filtered in C++.
    """
    if level == "DEBUG":
        return logging.getLogger("eventbus.pulsar")
    native = pulsar.LoggerLevel.Error if level == "ERROR" else pulsar.LoggerLevel.Warn
    return pulsar.FileLogger(native, "/dev/stderr")




_FINAL = ("Authentication", "Authorization", "InvalidTopicName", "InvalidConfiguration", "NotAllowed", "InvalidUrl")


def _transient(exc: BaseException) -> bool:
    """Errors that waiting can cure (timeouts, a busy or restarting broker), not configuration."""
    return not any(word in str(exc) for word in _FINAL)


def _broker_error(what: str, exc: BaseException) -> BrokerUnavailable:
    text = str(exc)
    if "Authentication" in text or "AuthenticationError" in text:
        text += " (authentication failed: check the token, EVENTBUS_TOKEN)"
    elif "Authorization" in text:
        text += " (the token's role is not allowed to do this)"
    return BrokerUnavailable(f"{what}: {text}")


async def _check_broker(url: str, token: str | None, settings: Settings) -> str:
    """Reach the broker and shake hands before the client would retry blindly for 30 s."""
    tls = None
    if url.startswith("pulsar+ssl://"):
        cafile = str(settings.tls_trust_certs_file) if settings.tls_trust_certs_file else None
        tls = ssl.create_default_context(cafile=cafile)
        tls.check_hostname = settings.tls_validate_hostname
    errors = []
    for host, port in broker_addresses(url):
        try:
            return await handshake(host, port, token, tls, settings.connection_timeout_ms / 1000)
        except HandshakeRejected as exc:
            if exc.error == "AuthenticationError":
                raise AuthenticationFailed(
                    f"the broker at {host}:{port} rejected authentication "
                    + ("(AuthenticationError): check EVENTBUS_TOKEN" if token else "(AuthenticationError): it needs a token, set EVENTBUS_TOKEN")
                ) from None
            errors.append(f"{host}:{port} ({exc})")
        except ssl.SSLError as exc:
            raise ConfigError(
                f"TLS with the broker at {host}:{port} failed ({exc.reason or exc}): set EVENTBUS_TLS_TRUST_CERTS_FILE "
                "to the CA that signed the broker's certificate"
            ) from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            errors.append(f"{host}:{port} ({reason})")
    raise BrokerUnavailable(f"cannot reach the broker at {', '.join(errors)}: is it running, and is EVENTBUS_URL right?")
