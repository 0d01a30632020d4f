"""Handling one message: call its handler, retry with backoff, enforce the timeout, dead-letter."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..broker.client import RawMessage, id_text, key_of, properties_of
from ..codec import DecodeError
from ..context import CURRENT, Attempt
from ..errors import Refuse, Reject, text
from ..message import Message, UnreadableMessage
from ..observing.events import Observer
from ..observing.metrics import Metrics
from ..observing.tracing import Tracing, failed
from ..registry import Subscription
from ..service.dependencies import AppScope
from ..service.handler import Publisher
from ..service.middleware import around_handler
from ..service.returns import Answers
from ..topics import dead_letter_properties
from .dead_letterer import DeadLetterer, Sender
from .deadlines import Deadlines, HandlerTimeout, sleep_unless
from .outputs import OnceSender, Outputs, Permit, Slot, Turns
from .payloads import TopicPayloads
from .reporting import report_for

__all__ = ["Handling", "HandlerTimeout", "Sender", "backoff", "cancelled_by_us", "sleep_unless", "verdict"]

log = logging.getLogger("eventbus")

#: One attempt's call: (payload, metadata, the bus), as `Handler.call`.
Call = Callable[[Any, "Message | None", Publisher], Awaitable[Any]]


def verdict(sub: Subscription, exc: BaseException, attempt: int) -> str:
    """What a failed attempt leads to: ``retry``, ``refused`` (acknowledged), or the dead-letter reason ``rejected``
    or ``handler-failed``."""
    if isinstance(exc, Refuse):
        return "refused"
    if isinstance(exc, Reject) or isinstance(exc, sub.reject_on):
        return "rejected"
    return "handler-failed" if attempt > sub.max_retries else "retry"


def backoff(sub: Subscription, attempt: int) -> float:
    """Seconds before the retry after failed attempt number `attempt`, before jitter."""
    return float(min(sub.retry_backoff * 2 ** (attempt - 1), sub.retry_backoff_max))


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
        app: AppScope | None = None,
        middleware: tuple[object, ...] = (),
        once: OnceSender | None = None,
        slot: Slot | None = None,
    ) -> None:
        """`dead_letter_topic`: where this topic's dead letters go, if not its own (a retry topic's: its main topic's).
        `app`: the worker's app-scoped dependency values (and overrides), for a handler with dependencies.
        `middleware`: the bus's, wrapped around the subscription's own (its router's) and the handler.
        `once`: the sender of an effectively-once subscription's outputs (None: they go at least once); `slot`: the
        key slot this runner's consumer holds (its outputs' producers are the slot's).

        `finished` is set once the runner hands out no more messages. Not at stop: a message in a retry's
        backoff is in flight, and the drain (bounded by its timeout) finishes it.
        """
        self.sub = sub
        #: How an AVRO topic's payloads are read (set by the runner once subscribed); None: as sent, JSON or bytes.
        self.payloads: TopicPayloads | None = None
        self._topic = topic
        self._bus = bus
        self._finished = finished
        self._tracing = tracing
        self._report = report_for(topic, sub.group, sub.name, metrics, observer)
        self._deadlines = Deadlines(sub.timeout) if sub.timeout else None
        call, self._wants_message = sub.handler.binding(app if app is not None else AppScope())
        call, wrapped = around_handler(call, (*middleware, *sub.middleware), batch=sub.batch is not None)
        self._wants_message = self._wants_message or wrapped
        self._numbered = self._wants_message or observer is not None or tracing is not None
        self._dead_letterer = DeadLetterer(
            dead_letters, dead_letter_topic or sub.dead_letter_topic(topic), tracing=tracing, report=self._report,
            stopped=finished, backoff=(sub.retry_backoff or 0.5, sub.retry_backoff_max),
        )
        self._call = self._attempt_call(call, metrics)
        self._answers = Answers(sub.name, bus, sub.returns_to, sub.handler.may_return, topic)
        # A return value is looked at only when the handler may give one, or has somewhere to send it.
        self._answering = sub.returns_to is not None or sub.handler.may_return
        # Log lines about a message carry these (JSON logs show them as fields).
        self._log_fields = {"topic": topic, "group": sub.group}
        self._once = once if sub.effectively_once else None
        #: The group as its outputs' producer names have it (a key slot's: with the slot).
        self.once_group = sub.group if slot is None else f"{sub.group}#{slot.index}"
        self._limit = slot.limit if slot is not None else None
        #: The inputs not yet done, in the order received (the runner admits them): outputs go in that order.
        self.turns = Turns() if self._once is not None else None
        if self._once is not None:
            self.handle = self._handle_once  # type: ignore[method-assign]

    async def release(self) -> None:
        """Close this subscription's effectively-once producers, before its consumer: the next holder needs them."""
        if self._once is not None:
            await self._once.release(self.once_group, self._topic.split("://", 1)[-1])

    @property
    def dead_letter_failures(self) -> int:
        """Dead-letter publishes that failed and were retried."""
        return self._dead_letterer.failures

    async def watchdog(self) -> None:
        """Cancel each handler call that runs past the subscription's timeout, until handling is finished."""
        if self._deadlines is not None:
            await self._deadlines.watchdog(self._finished)

    def _attempt_call(self, call: Call, metrics: Metrics | None) -> Call:
        """One attempt's call, built once: the handler itself, or timed and traced, as configured."""
        if metrics is not None:
            call = _timed(call, metrics.subscription(self._topic, self.sub.group).handler.observe)
        if self._tracing is not None:
            call = _traced(call, self._tracing, self._topic, self.sub.group)
        return call

    async def handle(self, message: RawMessage) -> bool:
        """Handle until done; True: acknowledge it (handled, dead-lettered or dropped), False: the bus stopped first."""
        sub = self.sub
        handler = sub.handler
        data = message.data()
        payloads = self.payloads
        try:
            payload = handler.decode(data) if payloads is None else await payloads.decode(message)
        except DecodeError as exc:
            return await self._give_up(message, "undecodable", exc, attempts=1, trace=False)
        current = self._context()
        attempt = 0
        while True:
            attempt += 1
            metadata = None
            try:
                # Counting the broker's redeliveries costs a call into the client: only when something shows it.
                number = message.redelivery_count() + attempt if self._numbered else attempt
                if self._wants_message:
                    metadata = Message.of(message, number)
                current.begin(message, attempt)
                slot = current.slot
                if slot is not None:
                    slot.start()
                try:
                    result = await self._call(payload, metadata, self._bus)
                except asyncio.CancelledError:
                    if slot is None or not slot.timed_out:
                        raise
                    raise slot.expired() from None
                finally:
                    current.active = False
                    if slot is not None:
                        slot.deadline = 0.0
                if current.publishes:
                    current.check()
                if self._answering and (result is not None or self._answers.always):
                    await self._answers.send(result, message)
                self._report.ok(message, payload, metadata, number)
                return True
            except UnreadableMessage as exc:
                return await self._give_up(message, "unreadable", exc, attempts=attempt, trace=False)
            except BaseException as exc:
                # Whatever a handler raises fails its message, CancelledError and
                # SystemExit included; only the bus's own cancellation goes through.
                if cancelled_by_us(exc):
                    raise
                then = verdict(sub, exc, attempt)
                if then == "refused":
                    return await self.refused(message, payload, exc, attempt)
                if then != "retry":
                    # A Reject is the handler's own word, not a bug: no traceback.
                    trace = not isinstance(exc, Reject)
                    return await self._give_up(message, then, exc, attempts=attempt, trace=trace, payload=payload)
                if await self._retry_later(message, payload, metadata, attempt, exc):
                    return False  # unacknowledged: redelivered
                # A fresh copy: the handler may have changed it.
                payload = handler.decode(data) if payloads is None else await payloads.decode(message)

    async def _handle_once(self, message: RawMessage) -> bool:
        """`handle`, with the message's outputs sent under ids derived from it, after every earlier message's."""
        assert self._once is not None and self.turns is not None
        permit = Permit(self._limit) if self._limit is not None else None
        outputs = Outputs(self.turns, self._once, self.once_group, message, permit)
        current = self._context()
        current.outputs = outputs
        handled = False
        try:
            if permit is not None:
                await permit.take()
            handled = await Handling.handle(self, message)
            return handled
        finally:
            if permit is not None:
                permit.give()
            current.outputs = None
            outputs.finish(handled)

    def _context(self) -> Attempt:
        """The lane task's attempt context, made once per task for all its messages: the handler's log lines
        carry the message's fields, and a publish it did not await fails the attempt."""
        current = CURRENT.get()
        if current is None or current.owner is not self:
            current = Attempt(self.sub.name, self._fields, owner=self)
            if self._deadlines is not None:
                current.slot = self._deadlines.slot()
            CURRENT.set(current)
        return current

    async def _retry_later(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, exc: BaseException
    ) -> bool:
        """Log and report a failed attempt, then wait out its backoff; True: the bus stopped first."""
        sub = self.sub
        delay = backoff(sub, attempt) * random.uniform(0.8, 1.2)
        # The traceback once per message: with its first failure (and with the dead-letter line).
        log.warning(
            "%s failed on %s (attempt %d of %d), retrying in %.2fs: %s",
            sub.name, label(message), attempt, sub.max_retries + 1, delay, text(exc),
            exc_info=exc if attempt == 1 else None, extra=self._fields(message, attempt),
        )
        self._report.retried(message, payload, metadata, message.redelivery_count() + attempt, exc)
        return await sleep_unless(self._finished, delay)

    async def refused(self, message: RawMessage, payload: Any, exc: BaseException, attempts: int) -> bool:
        """The handler said no (`Refuse`): acknowledged, counted, a requester told; True."""
        log.info("%s refused %s: %s", self.sub.name, label(message), text(exc), extra=self._fields(message, attempts))
        self._report.gave_up(message, payload, attempts, "refused", exc, None)
        await self._answers.failed(message, "refused", exc)
        return True

    async def _give_up(
        self, message: RawMessage, reason: str, exc: BaseException, attempts: int, trace: bool = True,
        payload: Any = None,
    ) -> bool:
        """Dead-letter a message (or drop it when dead-lettering is off); True once it may be acknowledged.

        `trace`: log the traceback (a failure in the handler's code, not in the message or a `Reject`).
        """
        sub = self.sub
        fields = self._fields(message, attempts)
        exc_info = exc if trace else None
        sent = None
        if sub.dead_letter:
            properties = dead_letter_properties(
                properties_of(message), reason=reason, exc=exc, attempts=attempts, topic=message.topic_name(),
                message_id=id_text(message.message_id()), group=sub.group,
                schema_version=-1 if self.payloads is None else message.int_schema_version(),
            )
            sent = await self._dead_letterer.send(message, properties, reason)
            if sent is None:
                return False
            log.error(
                "%s dead-lettered %s to %s after %d attempt(s) (%s): %s", sub.name, label(message), sent.topic,
                attempts, reason, text(exc), exc_info=exc_info, extra=fields,
            )
        else:
            log.error(
                "%s dropped %s after %d attempt(s) (%s): %s", sub.name, label(message), attempts, reason, text(exc),
                exc_info=exc_info, extra=fields,
            )
        self._report.gave_up(message, payload, attempts, reason, exc, sent)
        await self._answers.failed(message, reason, exc)
        return True

    def _fields(self, message: RawMessage, attempt: int) -> dict[str, object]:
        key = key_of(message)
        fields: dict[str, object] = {
            **self._log_fields, "message_id": id_text(message.message_id()),
            "attempt": message.redelivery_count() + attempt,
            "key": key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key,
        }
        if self._tracing is not None:
            parent = (properties_of(message) or {}).get("traceparent", "")  # version-traceid-spanid-flags
            if parent.count("-") == 3:
                fields["trace_id"] = parent.split("-")[1]
        return fields


def _timed(call: Call, observe: Callable[[float], None]) -> Call:
    async def timed(payload: Any, metadata: Message | None, bus: Publisher) -> Any:
        started = time.perf_counter()
        try:
            return await call(payload, metadata, bus)
        finally:
            observe(time.perf_counter() - started)

    return timed


def _traced(call: Call, tracing: Tracing, topic: str, group: str) -> Call:
    async def traced(payload: Any, metadata: Message | None, bus: Publisher) -> Any:
        current = CURRENT.get()
        assert current is not None  # the attempt context is set before every call
        message: RawMessage = current.message
        properties = properties_of(message) or {}
        attempt = message.redelivery_count() + current.number
        with tracing.process(topic, group, properties, id_text(message.message_id()), attempt) as span:
            try:
                return await call(payload, metadata, bus)
            except BaseException as exc:
                failed(span, exc)
                raise

    return traced


def cancelled_by_us(exc: BaseException) -> bool:
    """True for the cancellation the bus itself asked for (drain timeout, stop), not one a handler raised."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def label(message: RawMessage) -> str:
    """``message <id> key=<key>``, for logs."""
    key = key_of(message)
    return f"message {id_text(message.message_id())}{f' key={key!r}' if key else ''}"
