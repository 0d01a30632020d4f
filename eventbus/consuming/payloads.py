"""A topic's Avro payloads read for its handler: the writer's definition by the message's schema version, then its type."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..broker.client import RawMessage, properties_of
from ..broker.connect import Connection
from ..codec import DecodeError, Decoder, value_validator
from ..errors import EventBusError
from ..schemas import PayloadSchema, avro_reader
from ..service.handler import Handler
from ..topics import SCHEMA_VERSION

log = logging.getLogger("eventbus")

Fetch = Callable[[int], Awaitable[PayloadSchema | None]]
Reader = tuple[str, Callable[[bytes], Any]]


async def payloads_for(connection: Connection, topic: str, handler: Handler) -> TopicPayloads | None:
    """How the handler reads `topic` when its schema is AVRO (Java's `Schema.AVRO`, Go's `NewAvroSchema`); None: as
    sent (JSON or bytes), which is every topic the bus writes and every topic of the embedded broker."""
    if not connection.profile.schema_registry:
        return None
    try:
        schema = await connection.client.schema(topic)
    except EventBusError as exc:
        log.warning("cannot read the schema of %s (%s): its payloads are read as JSON", topic, exc)
        return None
    if schema is None or schema.kind != "AVRO":
        return None
    log.info("%s carries AVRO payloads (schema %s): %s reads them as Avro", topic, _record_name(schema), handler.name)
    return TopicPayloads(lambda version: connection.client.schema(topic, version), handler.payload_type, handler.decode)


class TopicPayloads:
    """Decodes one handler's payloads from an Avro topic, the writers' definitions fetched once per schema version."""

    def __init__(self, fetch: Fetch, payload_type: Any, decode_as_sent: Decoder) -> None:
        self._fetch = fetch
        self._readers: dict[int, Reader | None] = {}
        self._as_sent = decode_as_sent
        self._text = payload_type is str
        self._raw = payload_type is bytes
        self._convert = None if self._text or self._raw else value_validator(payload_type)

    async def decode(self, message: RawMessage) -> Any:
        """The payload for the handler; `DecodeError` naming the schema when it cannot be one."""
        version = message.int_schema_version()
        if version < 0:  # sent without a schema: a replayed dead letter names its writer's version, a bus's dict none
            version = _stated_version(message)
        if version < 0 or self._raw:  # sent as JSON or bytes, or the handler wants bytes
            return self._as_sent(message.data())
        if version not in self._readers:
            self._readers[version] = await self._reader(version)
        reader = self._readers[version]
        if reader is None:  # a version of another type (JSON): as sent
            return self._as_sent(message.data())
        name, read = reader
        if self._convert is None:
            raise DecodeError(f"an AVRO payload (schema {name}): a str handler takes text; annotate it with a model or dict")
        try:
            value = read(message.data())
        except Exception as exc:
            raise DecodeError(f"payload is not an AVRO {name} (schema version {version}): {type(exc).__name__}: {exc}") from None
        return self._convert(value)

    async def _reader(self, version: int) -> Reader | None:
        """The reader of `version`'s definition; the registry asked until it answers (the broker may be away)."""
        pause = 0.5
        while True:
            try:
                schema = await self._fetch(version)
                break
            except EventBusError as exc:
                log.warning("cannot read schema version %d (%s); asking again in %.1fs", version, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
        if schema is None or schema.kind != "AVRO":
            return None
        return _record_name(schema), avro_reader(schema.definition)


def _stated_version(message: RawMessage) -> int:
    """The writer's schema version a dead letter's copy names (`SCHEMA_VERSION`); -1: none."""
    stated = (properties_of(message) or {}).get(SCHEMA_VERSION, "")
    return int(stated) if stated.isdigit() and len(stated) < 19 else -1


def _record_name(schema: PayloadSchema) -> str:
    try:
        definition = orjson.loads(schema.definition)
    except orjson.JSONDecodeError:
        return schema.name or "?"
    if isinstance(definition, dict) and isinstance(definition.get("name"), str):
        namespace = definition.get("namespace")
        return f"{namespace}.{definition['name']}" if namespace else definition["name"]
    return schema.name or "?"
