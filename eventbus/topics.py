"""Names and properties of dead-letter and retry topics: what the bus writes there and `eventbus dlq` reads."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import detail

#: The subscription that keeps a dead-letter topic's messages until `eventbus dlq replay` sends them back.
REPLAY_SUBSCRIPTION = "eventbus-replay"
#: The property a replay writes on what it sends back: ``<dead-letter topic>@<id there>``.
REPLAYED_FROM = "eventbus-replayed-from"
#: Where a request wants its reply: one of the requesting bus's own reply topics (`service.returns` checks).
REPLY_TO = "eventbus-reply-to"
#: Written on a dead letter whose original properties could not be read (one was not UTF-8).
PROPERTIES_LOST = "eventbus-properties-lost"
#: On a dead letter of a record read with a schema (an AVRO topic), the writer's schema version on its original
#: topic: the letter and its replayed copy are stored without a schema, and are read with that version's definition.
SCHEMA_VERSION = "eventbus-schema-version"
_ERROR_TEXT_MAX = 2000

#: The properties the bus adds to a dead letter (`dead_letter_properties` writes them).
DEAD_LETTER_PROPERTIES = {
    "eventbus-dlq-reason": "handler-failed, rejected, undecodable or unreadable",
    "eventbus-error-type": "the class name of what the handler raised",
    "eventbus-error": "its message (at most 2,000 characters)",
    "eventbus-attempts": "how many times the handler ran",
    "eventbus-original-topic": "the topic the message came from",
    "eventbus-original-message-id": "its id there, ledger:entry:partition:batch (a chunked message's: first;last chunk)",
    "eventbus-subscription": "the group that gave up on it",
    # Java's DeadLetterPolicy names the same two, so its tools read the bus's dead letters too.
    "REAL_TOPIC": "the topic the message came from (the name Java's DeadLetterPolicy writes)",
    "ORIGIN_MESSAGE_ID": "its id there (the name Java's DeadLetterPolicy writes)",
}


def dead_letter_topic(full_topic: str, group: str) -> str:
    """Where `group`'s messages on `full_topic` go when it gives up on them."""
    return f"{full_topic}-{group}-DLQ"


def retry_topic(full_topic: str, group: str) -> str:
    """Where `eventbus dlq replay` sends `group`'s dead letters back: only that group consumes it."""
    return f"{full_topic}-{group}-RETRY"


def dead_letter_properties(
    original: Mapping[str, str] | None, *, reason: str, exc: BaseException, attempts: int, topic: str,
    message_id: str, group: str, schema_version: int = -1,
) -> dict[str, str]:
    """A dead letter's properties: the original ones (None: unreadable) and the documented `eventbus-` ones;
    `schema_version` (>= 0) names the writer's schema of a record read with one (`SCHEMA_VERSION`)."""
    properties = dict(original) if original is not None else {
        PROPERTIES_LOST: "a property was not UTF-8; the original ones are not copied"
    }
    properties.update(
        {
            "eventbus-dlq-reason": reason,
            "eventbus-error-type": encodable(type(exc).__name__),
            "eventbus-error": encodable(detail(exc)),
            "eventbus-attempts": str(attempts),
            "eventbus-original-topic": topic,
            "eventbus-original-message-id": message_id,
            "eventbus-subscription": group,
            "REAL_TOPIC": topic,
            "ORIGIN_MESSAGE_ID": message_id,
        }
    )
    if schema_version >= 0:
        properties[SCHEMA_VERSION] = str(schema_version)
    return properties


def encodable(value: str, limit: int = _ERROR_TEXT_MAX) -> str:
    """Text the client can write into a property: valid UTF-8 (lone surrogates escaped), bounded."""
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")[:limit]
