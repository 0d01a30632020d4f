"""What a handler can know about the message it is handling."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from .client import MessageId, RawMessage, key_of, properties_of

__all__ = ["Message", "MessageId", "UnreadableMessage"]


class UnreadableMessage(Exception):
    """The client cannot hand over part of a message (a property that is not UTF-8)."""


def _from_millis(ms: int) -> datetime | None:
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

    @classmethod
    def of(cls, raw: RawMessage, attempt: int) -> Message:
        """Read a received message; a key that is not UTF-8 is shown with backslash escapes."""
        properties = properties_of(raw)
        if properties is None:
            raise UnreadableMessage("a property is not UTF-8: Message.properties cannot hold it")
        key = key_of(raw)
        return cls(
            topic=raw.topic_name(),
            key=(key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key) or None,
            properties=properties,
            message_id=raw.message_id(),
            publish_time=_from_millis(raw.publish_timestamp()),
            event_time=_from_millis(raw.event_timestamp()),
            redelivery_count=raw.redelivery_count(),
            attempt=attempt,
            data=raw.data(),
        )
