"""What a handler can know about the message it is handling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone

from .broker.client import MessageId, RawMessage, key_of, properties_of

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

    @staticmethod
    def of(raw: RawMessage, attempt: int) -> Message:
        """A received message's metadata: the properties read now, every other part when first asked for.

        Raises `UnreadableMessage` when a property is not UTF-8 (`properties` could not hold it: the attempt fails
        as unreadable before the handler runs). A key that is not UTF-8 is shown with backslash escapes. Reading
        every part at once cost 9.2 us a message, more than the rest of a handler's dispatch; this costs 2.5.
        """
        properties = properties_of(raw)
        if properties is None:
            raise UnreadableMessage("a property is not UTF-8: Message.properties cannot hold it")
        received = object.__new__(_Received)
        object.__setattr__(received, "_raw", raw)
        object.__setattr__(received, "_attempt", attempt)
        object.__setattr__(received, "_properties", properties)
        return received


class _Received(Message):
    """`Message.of`: the fields but `properties` are read from the client's message on demand."""

    __slots__ = ("_raw", "_attempt", "_properties")

    _raw: RawMessage
    _attempt: int
    _properties: dict[str, str]

    def __new__(cls, *args: object, **kwargs: object) -> Message:  # type: ignore[misc]
        """A plain `Message` with these fields (what `dataclasses.replace` makes of one)."""
        return Message(*args, **kwargs)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return _values(self) == _values(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Message(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(Message)) + ")"

    @property
    def topic(self) -> str:
        return self._raw.topic_name()

    @property
    def key(self) -> str | None:
        key = key_of(self._raw)
        return (key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key) or None

    @property
    def properties(self) -> dict[str, str]:
        return self._properties

    @property
    def message_id(self) -> MessageId:
        return self._raw.message_id()

    @property
    def publish_time(self) -> datetime | None:
        return _from_millis(self._raw.publish_timestamp())

    @property
    def event_time(self) -> datetime | None:
        return _from_millis(self._raw.event_timestamp())

    @property
    def redelivery_count(self) -> int:
        return self._raw.redelivery_count()

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def data(self) -> bytes:
        return self._raw.data()


def _values(message: Message) -> tuple[object, ...]:
    return tuple(getattr(message, f.name) for f in dataclasses.fields(Message))
