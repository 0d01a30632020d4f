"""What a bus reports to an observer (the test kit): each confirmed publish, each handler attempt, each dead letter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..message import Message, MessageId

#: How one attempt ended; the same words as the `eventbus_messages_handled_total` metric's `outcome`.
Outcome = Literal["ok", "retried", "dead_lettered", "rejected", "refused", "invalid_payload", "dropped"]


@dataclass(frozen=True, slots=True)
class Published:
    """A message the broker confirmed: what the app passed to `publish` and what was sent."""

    topic: str
    key: str | bytes | None
    payload: Any
    properties: dict[str, str]
    data: bytes
    message_id: MessageId


@dataclass(frozen=True, slots=True)
class Handled:
    """One handler attempt on one message and how it ended (`error` is what the handler raised, if it did)."""

    topic: str
    group: str
    handler: str
    payload: Any
    message: Message | None
    outcome: Outcome
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A message the broker confirmed on a dead-letter topic, with the reason and the properties it carries."""

    topic: str
    group: str
    dead_letter_topic: str
    key: str | bytes | None
    data: bytes
    reason: str
    error_type: str
    error: str
    attempts: int
    properties: dict[str, str]
    #: Its id on the dead-letter topic.
    message_id: MessageId


Event = Published | Handled | DeadLettered


class Observer(Protocol):
    """Told of every event on the event loop's thread, as it happens; must not block."""

    def record(self, event: Event) -> None: ...
