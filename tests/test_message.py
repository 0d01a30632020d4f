"""`Message.of` reads a received message's parts on demand: each equals what reading them all at once gave."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import pulsar
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus import Message, Settings
from eventbus.broker.client import id_text, key_of, properties_of
from eventbus.message import UnreadableMessage

from .conftest import raw_client


def _from_millis(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms > 0 else None


def _eager(raw: Any, attempt: int) -> Message:
    """What `Message.of` built before it read lazily: every part at once."""
    key = key_of(raw)
    properties = properties_of(raw)
    assert properties is not None
    return Message(
        raw.topic_name(), (key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key) or None,
        properties, raw.message_id(), _from_millis(raw.publish_timestamp()), _from_millis(raw.event_timestamp()),
        raw.redelivery_count(), attempt, raw.data(),
    )


def test_each_part_read_on_demand_is_what_reading_it_all_at_once_gave(
    settings: Settings, topic: str, request: pytest.FixtureRequest
) -> None:
    url = settings.url or request.getfixturevalue("broker").url
    client = raw_client(url, settings.jwt())
    try:
        full = settings.topic(topic)
        consumer = client.subscribe(full, "g", initial_position=pulsar.InitialPosition.Earliest)
        producer = client.create_producer(full)
        event = int(datetime(2026, 12, 3, tzinfo=timezone.utc).timestamp() * 1000)
        producer.send(b'{"a":1}', properties={"tenant": "acme", "caf\u00e9": "cr\u00e8me"}, partition_key="k-1", event_timestamp=event)
        producer.send(b"raw", partition_key="\u00ff\u00fe")
        producer.send(b"")
        for _ in range(3):
            raw = consumer.receive(10_000)
            lazy = Message.of(raw, 2)
            eager = _eager(raw, 2)
            assert lazy == eager and eager == lazy
            assert [getattr(lazy, f.name) for f in dataclasses.fields(Message)] == [
                getattr(eager, f.name) for f in dataclasses.fields(Message)
            ]
            assert repr(lazy) == repr(eager) and isinstance(lazy, Message)
            changed = dataclasses.replace(lazy, attempt=5)
            assert type(changed) is Message and changed.attempt == 5 and changed.data == eager.data
            with pytest.raises(dataclasses.FrozenInstanceError):
                lazy.attempt = 3  # type: ignore[misc]
    finally:
        client.close()


def test_a_property_that_is_not_utf8_fails_before_the_handler_runs() -> None:
    class Raw:
        def properties(self) -> dict[str, str]:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with pytest.raises(UnreadableMessage, match="a property is not UTF-8"):
        Message.of(Raw(), 1)  # type: ignore[arg-type]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 as protobuf writes them: ten bytes of two's complement
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _id_data(ledger: int, entry: int, partition: int, batch: int, first: bytes | None = None) -> bytes:
    """`MessageIdData` on the wire, as the client serializes it (fields 1-4, and 7 for a chunked message)."""
    data = b"\x08" + _varint(ledger) + b"\x10" + _varint(entry) + b"\x18" + _varint(partition) + b"\x20" + _varint(batch)
    return data + (b"\x3a" + _varint(len(first)) + first if first is not None else b"")


_parts = st.tuples(
    st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), st.integers(-1, 2**31 - 1), st.integers(-1, 2**31 - 1)
)


@given(last=_parts, first=st.none() | _parts)
def test_an_id_is_named_by_its_parts_and_a_chunked_ones_by_its_first_chunk_too(
    last: tuple[int, int, int, int], first: tuple[int, int, int, int] | None
) -> None:
    """The client itself reads the wire form made here (its parts must be `last`'s), so the test's encoder is checked
    against it; then `id_text` must find the first chunk exactly when there is one. (A chunked message is never
    batched, and its chunks are on one partition: the client writes the last's partition for both.)"""
    if first is not None:
        first, last = (first[0], first[1], last[2], -1), (*last[:3], -1)
    message_id = pulsar.MessageId.deserialize(_id_data(*last, first=None if first is None else _id_data(*first)))
    assert (message_id.ledger_id(), message_id.entry_id(), message_id.partition(), message_id.batch_index()) == last
    named = ":".join(map(str, last))
    assert id_text(message_id) == (named if first is None else ":".join(map(str, first)) + ";" + named)
