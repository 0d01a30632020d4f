"""An AsyncAPI 3.0 document of an app: its topics, what each subscription receives, and what it declares it sends."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, TypeAdapter

from ..codec import BINARY, JSON
from ..registry import Router, Subscription
from ..service.returns import CORRELATION_ID, REPLY_FAILED
from ..settings import Settings
from ..topics import REPLY_TO
from ..topics import DEAD_LETTER_PROPERTIES, SCHEMA_VERSION

_PULSAR_BINDING = "0.1.0"


def _key(text: str) -> str:
    """A name AsyncAPI accepts as a key of channels, operations and components."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


class _Builder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self._channel_of: dict[str, str] = {}
        self._message_of: dict[Any, str] = {}

    def channel(self, topic: str, description: str | None = None) -> str:
        """The channel id of a full topic name, made on first use."""
        if topic in self._channel_of:
            return self._channel_of[topic]
        prefix = f"persistent://{self.settings.tenant}/{self.settings.namespace}/"
        base = _key(topic.removeprefix(prefix) if topic.startswith(prefix) else topic.split("://", 1)[-1])
        channel_id, n = base, 1
        while channel_id in self.channels:
            n += 1
            channel_id = f"{base}-{n}"
        persistence, _, rest = topic.partition("://")
        tenant, namespace = rest.split("/")[:2]
        self.channels[channel_id] = {
            "address": topic,
            "messages": {},
            **({"description": description} if description else {}),
            "bindings": {
                "pulsar": {"namespace": f"{tenant}/{namespace}", "persistence": persistence, "bindingVersion": _PULSAR_BINDING}
            },
        }
        self._channel_of[topic] = channel_id
        return channel_id

    def message(self, channel_id: str, payload_type: Any, dead_letter: bool = False) -> dict[str, str]:
        """A reference to the channel's message for `payload_type` (a component shared across channels)."""
        name = self._component(payload_type, dead_letter)
        self.channels[channel_id]["messages"][name] = {"$ref": f"#/components/messages/{name}"}
        return {"$ref": f"#/channels/{channel_id}/messages/{name}"}

    def _component(self, payload_type: Any, dead_letter: bool) -> str:
        known = self._message_of.get((payload_type, dead_letter))
        if known is not None:
            return known
        content_type, payload, name = self._payload(payload_type)
        message: dict[str, Any] = {"name": name, "contentType": content_type, "payload": payload}
        if dead_letter:
            name = f"{name}.dead-letter"
            message["name"] = name
            message["summary"] = "A message a subscription gave up on, as it was published, with why."
            message["headers"] = {"$ref": "#/components/schemas/eventbus.DeadLetterProperties"}
            self.schemas["eventbus.DeadLetterProperties"] = {
                "type": "object",
                "description": "Pulsar message properties the bus adds to a dead letter (the original ones are kept).",
                "properties": {
                    **{k: {"type": "string", "description": v} for k, v in DEAD_LETTER_PROPERTIES.items()},
                    SCHEMA_VERSION: {"type": "string", "description": "the writer's schema version of an AVRO record"},
                },
                "required": list(DEAD_LETTER_PROPERTIES),
            }
        unique, n = name, 1
        while unique in self.messages:
            n += 1
            unique = f"{name}-{n}"
        self.messages[unique] = message
        self._message_of[(payload_type, dead_letter)] = unique
        return unique

    def _payload(self, payload_type: Any) -> tuple[str, dict[str, Any], str]:
        """Content type, payload schema and a message name for a handler's or publisher's payload type."""
        if payload_type is Any or payload_type is object:
            return JSON, {"description": "any JSON value"}, "json"
        if payload_type is bytes:
            return BINARY, {"type": "string", "format": "binary"}, "bytes"
        if payload_type is str:
            return "text/plain", {"type": "string"}, "text"
        if payload_type is dict:
            return JSON, {"type": "object"}, "object"
        if payload_type is list:
            return JSON, {"type": "array"}, "array"
        schema = TypeAdapter(payload_type).json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            self.schemas.setdefault(name, definition)
        if isinstance(payload_type, type) and (issubclass(payload_type, BaseModel) or dataclasses.is_dataclass(payload_type)):
            name = _key(payload_type.__name__)
            if self.schemas.get(name, schema) != schema:
                name = _key(f"{payload_type.__module__}.{payload_type.__qualname__}")
            self.schemas[name] = schema
            return JSON, {"$ref": f"#/components/schemas/{name}"}, name
        return JSON, schema, _key(str(payload_type).replace("typing.", ""))

    def receive(self, topic: str, sub: Subscription) -> None:
        channel_id = self.channel(topic)
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [self.message(channel_id, sub.handler.payload_type)],
            "summary": f"{sub.group}: {sub.name}",
            "x-eventbus-subscription": {
                "group": sub.group,
                "subscriptionType": sub.subscription_type,
                "ordered": sub.ordered,
                "concurrency": sub.concurrency,
                "maxRetries": sub.max_retries,
                "retryBackoffSeconds": sub.retry_backoff,
                "retryBackoffMaxSeconds": sub.retry_backoff_max,
                "timeoutSeconds": sub.timeout,
                "initialPosition": sub.initial_position,
                "deadLetterTopic": sub.dead_letter_topic(topic) if sub.dead_letter else None,
                "returnsTo": self.settings.topic(sub.returns_to) if sub.returns_to else None,
                "batch": {"maxMessages": sub.batch.max_messages, "maxWaitSeconds": sub.batch.max_wait} if sub.batch else None,
            },
        }
        if sub.handler.may_return and sub.batch is None:
            operation["reply"] = {
                "address": {
                    "location": f"$message.header#/{REPLY_TO}",
                    "description": "The requester's reply topic (EventBus.request); the reply carries its "
                    f"{CORRELATION_ID} back, or {REPLY_FAILED} when the request was dead-lettered.",
                },
                "messages": [{"$ref": f"#/components/messages/{self._component(sub.handler.return_type, False)}"}],
            }
        doc = _docstring(sub.handler.func)
        if doc:
            operation["description"] = doc
        self.operations[_unique(self.operations, f"{channel_id}.{sub.group}.receive")] = operation
        if sub.returns_to and sub.handler.may_return:
            self.send(
                self.settings.topic(sub.returns_to), sub.handler.return_type, f"What {sub.name} returns (returns_to)."
            )
        if sub.dead_letter:
            dead = self.channel(sub.dead_letter_topic(topic), f"Dead letters of group {sub.group} on {topic}.")
            self.operations[_unique(self.operations, f"{channel_id}.{sub.group}.dead-letter")] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{dead}"},
                "messages": [self.message(dead, sub.handler.payload_type, dead_letter=True)],
                "summary": f"{sub.group} sends a message here after {sub.max_retries + 1} failed attempts, "
                "or at once when it is rejected or cannot be decoded",
            }
            retry = self.channel(
                sub.retry_topic(topic), f"Dead letters of group {sub.group} on {topic}, sent back by `eventbus dlq replay`."
            )
            self.operations[_unique(self.operations, f"{channel_id}.{sub.group}.receive-replayed")] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{retry}"},
                "messages": [self.message(retry, sub.handler.payload_type)],
                "summary": f"{sub.group}: {sub.name}, on its dead letters sent back to it",
            }

    def send(self, topic: str, payload_type: Any, description: str | None) -> None:
        channel_id = self.channel(topic)
        operation: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [self.message(channel_id, payload_type)],
        }
        if description:
            operation["description"] = description
        self.operations[_unique(self.operations, f"{channel_id}.send")] = operation


def _unique(taken: dict[str, Any], key: str) -> str:
    key, base, n = _key(key), _key(key), 1
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    return key


def _docstring(func: Any) -> str | None:
    doc = getattr(func, "__doc__", None)
    return " ".join(doc.split()) if isinstance(doc, str) and doc.strip() else None


def _servers(settings: Settings) -> dict[str, Any]:
    """The configured broker (its service URL's hosts, comma-separated as Pulsar takes them); none when embedded."""
    if not settings.url:
        return {}
    parts = urlsplit(settings.url)
    return {
        "broker": {
            "host": parts.netloc,
            "protocol": parts.scheme,
            "bindings": {"pulsar": {"tenant": settings.tenant, "bindingVersion": _PULSAR_BINDING}},
        }
    }


def document(
    routers: Sequence[Router], settings: Settings, *, title: str, version: str, description: str | None = None
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the routers' subscriptions and declared publishers, as a JSON-ready dict."""
    builder = _Builder(settings)
    for router in routers:
        for sub in router.subscriptions:
            builder.receive(settings.topic(sub.topic), sub)
        for publication in router.publications:
            builder.send(settings.topic(publication.topic), publication.payload_type, publication.description)
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    doc: dict[str, Any] = {"asyncapi": "3.0.0", "info": info, "defaultContentType": JSON}
    servers = _servers(settings)
    if servers:
        doc["servers"] = servers
    doc["channels"] = builder.channels
    doc["operations"] = builder.operations
    doc["components"] = {"messages": builder.messages, "schemas": builder.schemas}
    return doc
