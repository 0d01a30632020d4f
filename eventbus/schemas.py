"""Pulsar schemas: a pydantic model's JSON schema in the Avro record form Java and Go register, and Avro payloads read."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fastavro
import orjson
from pydantic import BaseModel

#: Avro's rule for record, enum and field names.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PRIMITIVES = {"string": "string", "integer": "long", "number": "double", "boolean": "boolean", "null": "null"}


class SchemaUnsupported(TypeError):
    """A payload type whose JSON has no Avro record form (the message names the field and why)."""


@dataclass(frozen=True)
class PayloadSchema:
    """A topic's schema as the broker registers it: its type (JSON), name and definition (Avro record JSON)."""

    kind: str
    name: str
    definition: str


def json_schema_of(model: type[BaseModel]) -> PayloadSchema:
    """The JSON schema Pulsar registers for `model`'s payloads: an Avro record, as Java's `Schema.JSON` makes.

    The record describes the JSON the bus sends (pydantic's serialization): `int` a long, `float` a double,
    datetimes, UUIDs and decimals strings, `T | None` a union with null (null first when the default is None),
    nested models records, `list` arrays, `dict[str, T]` maps. Raises `SchemaUnsupported` for what Avro cannot
    name (`Any`, tuples, fields whose names Avro refuses).

    >>> json_schema_of(Order).kind
    'JSON'
    """
    by_alias = bool(model.model_config.get("serialize_by_alias", False))
    document = model.model_json_schema(mode="serialization", by_alias=by_alias, ref_template="#/$defs/{model}")
    record = _Converter(document.get("$defs", {})).record(document, model.__name__)
    record["namespace"] = _namespace(model.__module__)
    return PayloadSchema("JSON", model.__name__, orjson.dumps(record).decode())


def avro_reader(definition: str) -> Callable[[bytes], Any]:
    """A reader of Avro payloads written with `definition` (a topic's AVRO schema): bytes to Python values.

    Raises `ValueError` for a definition Avro refuses; the reader raises what fastavro raises for bytes that
    are not such a record.
    """
    parsed = fastavro.parse_schema(orjson.loads(definition))

    def read(data: bytes) -> Any:
        return fastavro.schemaless_reader(io.BytesIO(data), parsed, None)

    return read


def _namespace(module: str) -> str:
    parts = [part for part in module.split(".") if _NAME.match(part)]
    return ".".join(parts) or "eventbus"


class _Converter:
    """JSON Schema (pydantic's) to Avro: named types defined once, referred to by name after."""

    def __init__(self, definitions: dict[str, Any]) -> None:
        self._definitions = definitions
        self._named: set[str] = set()

    def record(self, schema: dict[str, Any], name: str) -> dict[str, Any]:
        name = _checked_name(schema.get("title", name), "record")
        self._named.add(name)
        required = set(schema.get("required", ()))
        fields = []
        for field, spec in schema.get("properties", {}).items():
            if not _NAME.match(field):
                raise SchemaUnsupported(f"field {field!r} of {name}: Avro field names are letters, digits and _")
            avro = self.type_of(spec, f"{name}.{field}")
            entry: dict[str, Any] = {"name": field, "type": avro}
            if field not in required:
                entry = _with_default(entry, spec.get("default"))
            fields.append(entry)
        return {"type": "record", "name": name, "fields": fields}

    def type_of(self, spec: dict[str, Any], where: str) -> Any:
        if "$ref" in spec:
            return self._ref(spec["$ref"], where)
        if "anyOf" in spec or "oneOf" in spec:
            return self._union(spec.get("anyOf") or spec["oneOf"], where)
        if "enum" in spec or "const" in spec:
            return self._values(spec, where)
        kind = spec.get("type")
        if isinstance(kind, str) and kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        if kind == "array" and "prefixItems" not in spec:
            return {"type": "array", "items": self.type_of(spec.get("items", {}), f"{where}[]")}
        if kind == "object" and "properties" not in spec:
            values = spec.get("additionalProperties", {})
            return {"type": "map", "values": self.type_of(values if isinstance(values, dict) else {}, f"{where}{{}}")}
        if kind == "object":
            return self.record(spec, spec.get("title", where.rsplit(".", 1)[-1]))
        raise SchemaUnsupported(f"{where}: {_describe(spec)} has no Avro form; give it a concrete type")

    def _ref(self, ref: str, where: str) -> Any:
        name = ref.rsplit("/", 1)[-1]
        target = self._definitions.get(name)
        if target is None:
            raise SchemaUnsupported(f"{where}: unresolved reference {ref}")
        title = target.get("title", name)
        if title in self._named:
            return title
        if "enum" in target:
            return self._enum(target, where)
        return self.record(target, name)

    def _union(self, branches: list[dict[str, Any]], where: str) -> Any:
        types: list[Any] = []
        for branch in branches:
            avro = self.type_of(branch, where)
            for one in avro if isinstance(avro, list) else [avro]:
                if one not in types:
                    types.append(one)
        return types[0] if len(types) == 1 else types

    def _enum(self, spec: dict[str, Any], where: str) -> Any:
        """An Enum class: an Avro enum when its values are names (as Java's enums are), else its values' type."""
        values = spec["enum"]
        if all(isinstance(v, str) and _NAME.match(v) for v in values) and _NAME.match(spec.get("title", "")):
            self._named.add(spec["title"])
            return {"type": "enum", "name": spec["title"], "symbols": list(values)}
        return self._values(spec, where)

    def _values(self, spec: dict[str, Any], where: str) -> Any:
        """A `Literal` (or an enum of values Avro cannot name): the values' own type."""
        values = spec["enum"] if "enum" in spec else [spec["const"]]
        kinds = {_PRIMITIVES.get(_json_kind(v)) for v in values}
        if len(kinds) == 1 and None not in kinds:
            return kinds.pop()
        raise SchemaUnsupported(f"{where}: the values {values!r} mix types Avro cannot express as one")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else "unknown"


def _with_default(entry: dict[str, Any], default: Any) -> dict[str, Any]:
    """An optional field's default; Avro wants it to match the union's first branch, so the union is reordered."""
    avro = entry["type"]
    if default is None and isinstance(avro, list) and "null" in avro:
        entry["type"] = ["null", *[t for t in avro if t != "null"]]
        entry["default"] = None
    elif isinstance(default, (str, int, float, bool, list, dict)):
        if isinstance(avro, list):
            first = [t for t in avro if t == _PRIMITIVES.get(_json_kind(default))]
            entry["type"] = first + [t for t in avro if t not in first]
        entry["default"] = default
    return entry


def _checked_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise SchemaUnsupported(f"{what} name {name!r}: Avro names are letters, digits and _")
    return name


def _describe(spec: dict[str, Any]) -> str:
    return "Any" if not spec else orjson.dumps(spec).decode()[:80]
