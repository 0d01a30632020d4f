"""Handling one message: call its handler, retry with backoff, enforce the timeout, dead-letter."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

import anyio

from .client import MessageId, RawMessage, id_text, key_of
from .codec import DecodeError
from .context import CURRENT, Attempt
from .errors import Reject
from .events import DeadLettered, Handled, Observer, Outcome
from .handler import Publisher
from .message import Message, UnreadableMessage
from .metrics import Metrics
from .tracing import Tracing, failed
from .registry import Subscription

log = logging.getLogger("eventbus")

_ERROR_TEXT_MAX = 2000
#: The properties the bus adds to a dead letter (`Handling._give_up` writes them).
DEAD_LETTER_PROPERTIES = {
    "eventbus-dlq-reason": "handler-failed, rejected, undecodable or unreadable",
    "eventbus-error-type": "the class name of what the handler raised",
    "eventbus-error": "its message (at most 2,000 characters)",
    "eventbus-attempts": "how many times the handler ran",
    "eventbus-original-topic": "the topic the message came from",
    "eventbus-original-message-id": "its id there, ledger:entry:partition:batch",
    "eventbus-subscription": "the group that gave up on it",
}


#: The subscription that keeps a dead-letter topic's messages until `eventbus dlq replay` sends them back.
REPLAY_SUBSCRIPTION = "eventbus-replay"


class Sender(Protocol):
    """Where dead letters go: bytes as they are, with their key and properties, kept by a subscription."""

    async def send(
        self, topic: str, data: bytes, *, key: str | bytes | None, properties: Mapping[str, str]
    ) -> MessageId: ...

    async def retain(self, topic: str, subscription: str) -> None: ...


class HandlerTimeout(Exception):
    """A handler ran past its subscription's `timeout`."""


def verdict(sub: Subscription, exc: BaseException, attempt: int) -> str:
    """What a failed attempt leads to: ``retry``, or the dead-letter reason ``rejected`` or ``handler-failed``."""
    if isinstance(exc, Reject) or isinstance(exc, sub.reject_on):
        return "rejected"
    return "handler-failed" if attempt > sub.max_retries else "retry"


def backoff(sub: Subscription, attempt: int) -> float:
    """Seconds before the retry after failed attempt number `attempt`, before jitter."""
    return float(min(sub.retry_backoff * 2 ** (attempt - 1), sub.retry_backoff_max))


def outcome_of(reason: str, dead_lettered: bool) -> Outcome:
    """The outcome a dead-letter reason counts as."""
    if reason in ("undecodable", "unreadable"):
        return "invalid_payload"
    if reason == "rejected":
        return "rejected"
    return "dead_lettered" if dead_lettered else "dropped"


class Handling:
    """Runs a subscription's handler on its messages; says when a message may be acknowledged."""

    def __init__(
        self,
        sub: Subscription,
        topic: str,
        bus: Publisher,
        dead_letters: Sender,
        finished: asyncio.Event,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        observer: Observer | None = None,
        dead_letter_topic: str | None = None,
    ) -> None:
        """`dead_letter_topic`: where this topic's dead letters go, if not its own (a retry topic's: its main topic's)."""
        dead_letter_topic = dead_letter_topic or sub.dead_letter_topic(topic)
        self.sub = sub
        self.dead_letter_topic = dead_letter_topic
        self._bus = bus
        self._dead_letters = dead_letters
        # Set once the runner hands out no more messages. Not at stop: a message in a
        # retry's backoff is in flight, and the drain (bounded by its timeout) finishes it.
        self._finished = finished
        self._call_handler = sub.handler.call
        self._loop = asyncio.get_running_loop()
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._timed_out: set[asyncio.Task[Any]] = set()
        #: Dead-letter publishes that failed and are being retried (the message's key waits meanwhile).
        self.dead_letter_failures = 0
        self._tracing = tracing
        self._observer = observer
        self._topic = topic
        self._counts = metrics.subscription(topic, sub.group) if metrics is not None else None
        # Chosen once: without metrics a handler call is one coroutine frame fewer.
        self._call = self._call_with_deadline if self._counts is None else self._call_counted
        # Log lines about a message carry these (JSON logs show them as fields).
        self._log_fields = {"topic": topic, "group": sub.group}

    async def handle(self, message: RawMessage) -> bool:
        """Handle until done; True: acknowledge it (handled, dead-lettered or dropped), False: the bus stopped first."""
        sub = self.sub
        handler = sub.handler
        data = message.data()
        try:
            payload = handler.decode(data)
        except DecodeError as exc:
            return await self._give_up(message, "undecodable", exc, attempts=1, trace=False)
        earlier = message.redelivery_count()
        attempt = 0
        while True:
            attempt += 1
            metadata = None
            try:
                metadata = Message.of(message, earlier + attempt) if handler.wants_message else None
                # The handler's own log lines carry the message's fields; its publishes must be awaited.
                current = self._attempts()
                current.begin(message, earlier + attempt)
                try:
                    if self._tracing is None:
                        await self._call(payload, metadata)
                    else:
                        await self._call_traced(self._tracing, payload, metadata, message, earlier + attempt)
                finally:
                    current.active = False
                if current.publishes:
                    current.check()
                if self._counts is not None:
                    self._counts.outcomes["ok"] += 1
                if self._observer is not None:
                    self._observe(message, payload, metadata, earlier + attempt, "ok", None)
                return True
            except UnreadableMessage as exc:
                return await self._give_up(message, "unreadable", exc, attempts=attempt, trace=False)
            except BaseException as exc:
                # Whatever a handler raises fails its message, CancelledError and
                # SystemExit included; only the bus's own cancellation goes through.
                if cancelled_by_us(exc):
                    raise
                then = verdict(sub, exc, attempt)
                if then != "retry":
                    # A Reject is the handler's own word, not a bug: no traceback.
                    trace = not isinstance(exc, Reject)
                    return await self._give_up(message, then, exc, attempts=attempt, trace=trace, payload=payload)
                delay = backoff(sub, attempt) * random.uniform(0.8, 1.2)
                # The traceback once per message: with its first failure (and with the dead-letter line).
                log.warning(
                    "%s failed on %s (attempt %d of %d), retrying in %.2fs: %s",
                    sub.name, label(message), attempt, sub.max_retries + 1, delay, text(exc),
                    exc_info=exc if attempt == 1 else None, extra=self._fields(message, attempt),
                )
                if self._counts is not None:
                    self._counts.outcomes["retried"] += 1
                if self._observer is not None:
                    self._observe(message, payload, metadata, earlier + attempt, "retried", exc)
                if await sleep_unless(self._finished, delay):
                    return False  # unacknowledged: redelivered
                payload = handler.decode(data)  # a fresh copy: the handler may have changed it

    def _attempts(self) -> Attempt:
        """The attempt context of the lane task running this: made once per task, for all its messages."""
        current = CURRENT.get()
        if current is None or current.owner is not self:
            current = Attempt(self.sub.name, self._fields, owner=self)
            CURRENT.set(current)
        return current

    def _observe(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, outcome: Outcome,
        exc: BaseException | None,
    ) -> None:
        assert self._observer is not None
        if metadata is None:
            try:
                metadata = Message.of(message, attempt)
            except UnreadableMessage:
                pass
        sub = self.sub
        self._observer.record(Handled(self._topic, sub.group, sub.name, payload, metadata, outcome, exc))

    async def _call_counted(self, payload: Any, metadata: Message | None) -> None:
        assert self._counts is not None
        started = time.perf_counter()
        try:
            await self._call_with_deadline(payload, metadata)
        finally:
            self._counts.handler.observe(time.perf_counter() - started)

    async def _call_traced(
        self, tracing: Tracing, payload: Any, metadata: Message | None, message: RawMessage, attempt: int
    ) -> None:
        try:
            properties = dict(message.properties())
        except UnicodeDecodeError:
            properties = {}
        with tracing.process(self._topic, self.sub.group, properties, id_text(message.message_id()), attempt) as span:
            try:
                await self._call(payload, metadata)
            except BaseException as exc:
                failed(span, exc)
                raise

    async def _call_with_deadline(self, payload: Any, metadata: Message | None) -> None:
        call = self._call_handler
        timeout = self.sub.timeout
        if not timeout:
            await call(payload, metadata, self._bus)
            return
        # A deadline per call, enforced by `watchdog`: a cancel scope per message
        # costs 5-7 us, more than the rest of the dispatch.
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = self._loop.time() + timeout
        try:
            await call(payload, metadata, self._bus)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
        finally:
            del self._deadlines[task]
        if task in self._timed_out:
            self._timed_out.discard(task)
            task.uncancel()
            raise HandlerTimeout(f"the handler did not finish within {timeout:g}s (subscribe(timeout=...))")

    async def watchdog(self) -> None:
        """Cancel each handler call that runs past the subscription's timeout, until handling is finished."""
        timeout = self.sub.timeout
        assert timeout
        while not await sleep_unless(self._finished, min(timeout / 4, 1.0)):
            now = self._loop.time()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()

    async def _give_up(
        self, message: RawMessage, reason: str, exc: BaseException, attempts: int, trace: bool = True,
        payload: Any = None,
    ) -> bool:
        """Dead-letter a message (or drop it when dead-lettering is off); True once it may be acknowledged.

        `trace`: log the traceback (a failure in the handler's code, not in the message or a `Reject`).
        """
        sub = self.sub
        error = text(exc)
        exc_info = exc if trace else None
        fields = self._fields(message, attempts)
        if not sub.dead_letter:
            log.error(
                "%s dropped %s after %d attempt(s) (%s): %s", sub.name, label(message), attempts, reason, error,
                exc_info=exc_info, extra=fields,
            )
            self._count(reason, dead_lettered=False)
            if self._observer is not None:
                self._observe(message, payload, None, attempts, outcome_of(reason, False), exc)
            return True
        try:
            properties = dict(message.properties())
        except UnicodeDecodeError:
            properties = {"eventbus-properties-lost": "a property was not UTF-8; the original ones are not copied"}
        properties.update(
            {
                "eventbus-dlq-reason": reason,
                "eventbus-error-type": encodable(type(exc).__name__),
                "eventbus-error": encodable(detail(exc)),
                "eventbus-attempts": str(attempts),
                "eventbus-original-topic": message.topic_name(),
                "eventbus-original-message-id": id_text(message.message_id()),
                "eventbus-subscription": sub.group,
            }
        )
        delay = sub.retry_backoff or 0.5
        while True:
            try:
                # Before the first dead letter: without a subscription Apache Pulsar would not keep it.
                await self._dead_letters.retain(self.dead_letter_topic, REPLAY_SUBSCRIPTION)
                if self._tracing is None:
                    dead_id = await self._dead_letters.send(
                        self.dead_letter_topic, message.data(), key=key_of(message) or None, properties=properties
                    )
                else:
                    with self._tracing.send(self.dead_letter_topic, properties, **{"eventbus.dlq.reason": reason}) as (_, traced):
                        dead_id = await self._dead_letters.send(
                            self.dead_letter_topic, message.data(), key=key_of(message) or None, properties=traced
                        )
                break
            except Exception as dlq_exc:
                # Not acknowledged until it is safely dead-lettered; the key waits.
                self.dead_letter_failures += 1
                if self._counts is not None:
                    self._counts.dead_letters["error"] += 1
                log.error(
                    "cannot dead-letter %s to %s (retrying in %.1fs): %s", label(message), self.dead_letter_topic,
                    delay, text(dlq_exc),
                )
                if await sleep_unless(self._finished, delay):
                    return False
                delay = min(delay * 2, sub.retry_backoff_max)
        log.error(
            "%s dead-lettered %s to %s after %d attempt(s) (%s): %s", sub.name, label(message),
            self.dead_letter_topic, attempts, reason, error, exc_info=exc_info, extra=fields,
        )
        if self._counts is not None:
            self._counts.dead_letters["ok"] += 1
        self._count(reason, dead_lettered=True)
        if self._observer is not None:
            self._observe(message, payload, None, attempts, outcome_of(reason, True), exc)
            key = key_of(message)
            self._observer.record(
                DeadLettered(
                    self._topic, sub.group, self.dead_letter_topic, key or None, message.data(), reason,
                    properties["eventbus-error-type"], properties["eventbus-error"], attempts, properties, dead_id,
                )
            )
        return True

    def _count(self, reason: str, dead_lettered: bool) -> None:
        if self._counts is not None:
            self._counts.outcomes[outcome_of(reason, dead_lettered)] += 1

    def _fields(self, message: RawMessage, attempt: int) -> dict[str, object]:
        key = key_of(message)
        fields: dict[str, object] = {
            **self._log_fields, "message_id": id_text(message.message_id()), "attempt": attempt,
            "key": key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key,
        }
        if self._tracing is not None:
            try:
                parent = message.properties().get("traceparent", "")  # version-traceid-spanid-flags
            except UnicodeDecodeError:
                parent = ""
            if parent.count("-") == 3:
                fields["trace_id"] = parent.split("-")[1]
        return fields


async def sleep_unless(event: asyncio.Event, delay: float) -> bool:
    """Sleep `delay` seconds; True (at once) if `event` is set first."""
    with anyio.move_on_after(delay):
        await event.wait()
        return True
    return False


def cancelled_by_us(exc: BaseException) -> bool:
    """True for the cancellation the bus itself asked for (drain timeout, stop), not one a handler raised."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def detail(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException:
        return "<str() of the exception raised>"


def text(exc: BaseException) -> str:
    """``Type: message`` for any exception."""
    message = detail(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def encodable(value: str, limit: int = _ERROR_TEXT_MAX) -> str:
    """Text the client can write into a property: valid UTF-8 (lone surrogates escaped), bounded."""
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def label(message: RawMessage) -> str:
    """``message <id> key=<key>``, for logs."""
    key = key_of(message)
    return f"message {id_text(message.message_id())}{f' key={key!r}' if key else ''}"
