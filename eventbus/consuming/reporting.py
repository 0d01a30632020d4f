"""What a subscription's handling tells, chosen once per subscription: its metrics, the observer, both, or nobody."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..broker.client import MessageId, RawMessage, key_of
from ..message import Message, UnreadableMessage
from ..observing.events import DeadLettered, Handled, Observer, Outcome
from ..observing.metrics import Metrics, SubscriptionCounts


def outcome_of(reason: str, dead_lettered: bool) -> Outcome:
    """The outcome a dead-letter reason counts as."""
    if reason in ("undecodable", "unreadable"):
        return "invalid_payload"
    if reason == "rejected":
        return "rejected"
    if reason == "refused":
        return "refused"
    return "dead_lettered" if dead_lettered else "dropped"


@dataclass(frozen=True, slots=True)
class Sent:
    """A dead letter the broker confirmed: where, with what properties, under which id."""

    topic: str
    properties: dict[str, str]
    message_id: MessageId


class Report:
    """Tells nobody: what a subscription without metrics or an observer gets, and the base of the others."""

    def ok(self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int) -> None:
        """An attempt succeeded (`metadata`: the `Message` the handler got, if it asked for one)."""

    def retried(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, exc: BaseException
    ) -> None:
        """An attempt failed and will be retried."""

    def gave_up(
        self, message: RawMessage, payload: Any, attempts: int, reason: str, exc: BaseException, sent: Sent | None
    ) -> None:
        """The bus gave up on a message: dead-lettered (`sent`), or dropped (None: dead-lettering off)."""

    def dead_letter_failed(self) -> None:
        """A dead-letter publish failed (it is retried)."""


class Counting(Report):
    """Counts into the subscription's metrics."""

    def __init__(self, counts: SubscriptionCounts) -> None:
        self._counts = counts
        self._outcomes = counts.outcomes

    def ok(self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int) -> None:
        self._outcomes["ok"] += 1

    def retried(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, exc: BaseException
    ) -> None:
        self._outcomes["retried"] += 1

    def gave_up(
        self, message: RawMessage, payload: Any, attempts: int, reason: str, exc: BaseException, sent: Sent | None
    ) -> None:
        if sent is not None:
            self._counts.dead_letters["ok"] += 1
        self._outcomes[outcome_of(reason, sent is not None)] += 1

    def dead_letter_failed(self) -> None:
        self._counts.dead_letters["error"] += 1


class Observing(Report):
    """Tells the observer (the test kit) of each attempt and dead letter."""

    def __init__(self, observer: Observer, topic: str, group: str, handler: str) -> None:
        self._record = observer.record
        self._where = (topic, group, handler)

    def ok(self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int) -> None:
        self._handled(message, payload, metadata, attempt, "ok", None)

    def retried(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, exc: BaseException
    ) -> None:
        self._handled(message, payload, metadata, attempt, "retried", exc)

    def gave_up(
        self, message: RawMessage, payload: Any, attempts: int, reason: str, exc: BaseException, sent: Sent | None
    ) -> None:
        self._handled(message, payload, None, attempts, outcome_of(reason, sent is not None), exc)
        if sent is not None:
            topic, group, _ = self._where
            properties = sent.properties
            self._record(
                DeadLettered(
                    topic, group, sent.topic, key_of(message) or None, message.data(), reason,
                    properties["eventbus-error-type"], properties["eventbus-error"], attempts, properties,
                    sent.message_id,
                )
            )

    def _handled(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, outcome: Outcome,
        exc: BaseException | None,
    ) -> None:
        if metadata is None:
            try:
                metadata = Message.of(message, attempt)
            except UnreadableMessage:
                pass
        self._record(Handled(*self._where, payload, metadata, outcome, exc))


class Both(Report):
    """Counts, then tells the observer."""

    def __init__(self, first: Report, second: Report) -> None:
        self._first, self._second = first, second

    def ok(self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int) -> None:
        self._first.ok(message, payload, metadata, attempt)
        self._second.ok(message, payload, metadata, attempt)

    def retried(
        self, message: RawMessage, payload: Any, metadata: Message | None, attempt: int, exc: BaseException
    ) -> None:
        self._first.retried(message, payload, metadata, attempt, exc)
        self._second.retried(message, payload, metadata, attempt, exc)

    def gave_up(
        self, message: RawMessage, payload: Any, attempts: int, reason: str, exc: BaseException, sent: Sent | None
    ) -> None:
        self._first.gave_up(message, payload, attempts, reason, exc, sent)
        self._second.gave_up(message, payload, attempts, reason, exc, sent)

    def dead_letter_failed(self) -> None:
        self._first.dead_letter_failed()
        self._second.dead_letter_failed()


def report_for(
    topic: str, group: str, handler: str, metrics: Metrics | None, observer: Observer | None
) -> Report:
    """The one reporter a subscription's handling uses."""
    reports = [
        *([Counting(metrics.subscription(topic, group))] if metrics is not None else []),
        *([Observing(observer, topic, group, handler)] if observer is not None else []),
    ]
    if len(reports) == 2:
        return Both(*reports)
    return reports[0] if reports else Report()
