"""A declared model's Pulsar schema: the Avro record form Java's `Schema.JSON` registers, describing the bus's JSON."""

from __future__ import annotations

import enum
import io
import json
import logging
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import fastavro
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from eventbus import EventBus, Router, Settings
from eventbus.codec import encode
from eventbus.registry import declared_schemas
from eventbus.consuming.payloads import TopicPayloads
from eventbus.schemas import PayloadSchema, SchemaUnsupported, json_schema_of
from eventbus.topics import SCHEMA_VERSION

from .conftest import eventually, running


class Colour(enum.Enum):
    RED = "RED"
    BLUE = "BLUE"


class Line(BaseModel):
    sku: str
    qty: int = 1


class Order(BaseModel):
    id: str
    total: float
    paid: bool = False
    note: str | None = None
    when: datetime
    ref: UUID
    lines: list[Line]
    first: Line | None = None
    colour: Colour = Colour.RED
    kind: Literal["retail", "trade"] = "retail"
    tags: dict[str, int] = {}
    count: int | None = 3


def test_a_model_becomes_an_avro_record_with_its_nested_models_enums_and_optional_fields() -> None:
    schema = json_schema_of(Order)
    record = json.loads(schema.definition)
    assert (schema.kind, schema.name, record["name"], record["namespace"]) == ("JSON", "Order", "Order", "tests.test_schemas")
    fields = {f["name"]: f for f in record["fields"]}
    assert fields["id"] == {"name": "id", "type": "string"}
    assert fields["total"]["type"] == "double" and fields["paid"] == {"name": "paid", "type": "boolean", "default": False}
    assert fields["note"] == {"name": "note", "type": ["null", "string"], "default": None}  # null first: its default
    assert fields["count"] == {"name": "count", "type": ["long", "null"], "default": 3}  # the default's type first
    assert fields["when"]["type"] == fields["ref"]["type"] == "string"  # as the JSON carries them
    assert fields["lines"]["type"]["items"]["name"] == "Line" and fields["first"]["type"] == ["null", "Line"]
    assert fields["colour"]["type"] == {"type": "enum", "name": "Colour", "symbols": ["RED", "BLUE"]}
    assert fields["kind"]["type"] == "string" and fields["tags"]["type"] == {"type": "map", "values": "long"}
    fastavro.parse_schema(record)  # a definition Avro itself accepts


lines = st.builds(Line, sku=st.text(max_size=5), qty=st.integers(-(2**63), 2**63 - 1))
orders = st.builds(
    Order, id=st.text(max_size=8), total=st.floats(allow_nan=False, allow_infinity=False),
    note=st.none() | st.text(max_size=5), when=st.datetimes(), ref=st.uuids(), lines=st.lists(lines, max_size=3),
    first=st.none() | lines, colour=st.sampled_from(Colour), kind=st.sampled_from(["retail", "trade"]),
    tags=st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=3),
    count=st.none() | st.integers(-(2**63), 2**63 - 1),
)


@settings(max_examples=200, deadline=None)
@given(orders)
def test_the_registered_schema_describes_every_payload_the_bus_sends(order: Order) -> None:
    """What a Java or Go reader relies on: the JSON on the wire is a record of the registered definition."""
    parsed = fastavro.parse_schema(json.loads(json_schema_of(Order).definition))
    data, _ = encode(order)
    assert fastavro.validation.validate(orjson.loads(data), parsed, raise_errors=True)


class Loose(BaseModel):
    id: str
    extra: Any


class Pair(BaseModel):
    pair: tuple[int, str]


@pytest.mark.parametrize(("model", "named"), [(Loose, "Loose.extra"), (Pair, "Pair.pair")])
def test_a_field_avro_cannot_name_is_refused_naming_it(model: type[BaseModel], named: str) -> None:
    with pytest.raises(SchemaUnsupported, match=named):
        json_schema_of(model)


class Invoice(BaseModel):
    order: str
    total: float


def test_declared_topics_get_their_models_schema_and_ambiguous_ones_none_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router()
    router.publisher("orders", Order)
    router.publisher("raw", dict)
    router.publisher("mixed", Order)
    router.publisher("loose", Loose)

    @router.subscribe("orders", "billing", returns_to="invoices")
    async def charge(order: Order) -> Invoice | None:
        return None

    @router.subscribe("orders", "audit", returns_to="mixed")
    async def audit(order: Order) -> Invoice:
        return Invoice(order=order.id, total=order.total)

    settings = Settings(_env_file=None)
    with caplog.at_level(logging.WARNING, "eventbus"):
        schemas = declared_schemas([router], settings.topic)
    assert {topic.rsplit("/", 1)[-1]: s.name for topic, s in schemas.items()} == {"orders": "Order", "invoices": "Invoice"}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "mixed is declared with Invoice, Order" in warnings[0] or "mixed is declared with Invoice, Order" in warnings[1]
    assert any("Loose has no Avro form" in w and "Loose.extra" in w for w in warnings)


async def test_a_declared_models_topic_carries_its_schema_and_its_handler_gets_what_was_sent(
    settings: Settings, topic: str
) -> None:
    """pulsar-lite takes a producer that carries a schema as Apache Pulsar does; handlers read the JSON as before."""
    got: list[Invoice] = []
    router = Router()
    router.publisher(topic, Invoice)

    @router.subscribe(topic, "billing", initial_position="earliest")
    async def bill(invoice: Invoice) -> None:
        got.append(invoice)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, Invoice(order="o-1", total=2.5), key="o-1")
        await eventually(lambda: got)
    assert got == [Invoice(order="o-1", total=2.5)]


class _Copy:
    """A message stored without a schema (a replayed dead letter's copy): only what `TopicPayloads` reads."""

    def __init__(self, data: bytes, properties: dict[str, str]) -> None:
        self._data, self._properties = data, properties

    def int_schema_version(self) -> int:
        return -1

    def data(self) -> bytes:
        return self._data

    def properties(self) -> dict[str, str]:
        return self._properties


class Point(BaseModel):
    x: int
    label: str


@pytest.mark.parametrize(
    ("stated", "read_as"),
    [("3", "avro"), (None, "json"), ("", "json"), ("-1", "json"), ("3x", "json"), ("9" * 40, "json")],
)
async def test_a_copy_naming_its_writers_schema_version_is_read_with_it_and_any_other_as_sent(
    stated: str | None, read_as: str
) -> None:
    """Only a whole, plausible version counts; anything else on the property leaves the payload read as sent."""
    definition = {"type": "record", "name": "Point", "fields": [{"name": "x", "type": "long"}, {"name": "label", "type": "string"}]}
    asked: list[int] = []

    async def fetch(version: int) -> PayloadSchema:
        asked.append(version)
        return PayloadSchema("AVRO", "Point", json.dumps(definition))

    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(definition), {"x": 7, "label": "seven"})
    data = out.getvalue() if read_as == "avro" else orjson.dumps({"x": 8, "label": "eight"})
    payloads = TopicPayloads(fetch, Point, lambda raw: Point.model_validate_json(raw))
    decoded = await payloads.decode(_Copy(data, {} if stated is None else {SCHEMA_VERSION: stated}))  # type: ignore[arg-type]
    assert decoded == (Point(x=7, label="seven") if read_as == "avro" else Point(x=8, label="eight"))
    assert asked == ([3] if read_as == "avro" else [])
