"""What a handler can know about the message it is handling."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import _pulsar

#: The id the broker gave a message: ``str(id)`` is readable, ``id.serialize()`` is stable bytes.
MessageId = _pulsar.MessageId


def from_millis(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms > 0 else None


@dataclass(frozen=True, slots=True)
class Message:
    """Metadata of the message being handled; annotate a handler parameter with it.

    >>> @subscribe("orders", "audit")
    ... async def audit(order: dict, msg: Message) -> None:
    ...     print(msg.topic, msg.key, msg.attempt)
    """

    topic: str
    key: str | None
    properties: dict[str, str]
    message_id: MessageId
    publish_time: datetime | None
    event_time: datetime | None
    redelivery_count: int
    #: 1 on the first try; counts retries in this worker on top of the broker's redeliveries.
    attempt: int
    data: bytes
