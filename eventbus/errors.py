"""Exceptions the bus raises to its users."""

from __future__ import annotations

from collections.abc import Sequence

import _pulsar
import pulsar.asyncio

#: What the client raises: its sync API and its asyncio API use different classes.
PULSAR_ERRORS = (_pulsar.PulsarException, pulsar.asyncio.PulsarException)


class EventBusError(Exception):
    """Base of the errors this package raises."""


class ConfigError(EventBusError):
    """Settings, handler modules or options that cannot work; the CLI exits 2."""


class BrokerUnavailable(EventBusError):
    """The broker could not be reached or refused us; the CLI exits 1."""


class AuthenticationFailed(ConfigError):
    """The broker rejected the token (or wants one); the CLI exits 2."""


class SubscriptionFailed(EventBusError):
    """A subscription died of something the bus did not expect; `run()` raises it after draining the rest."""


class PublishError(EventBusError):
    """The broker did not confirm a message.

    `maybe_stored` is False when the message was certainly not stored (the bus
    or the broker refused it before storing: safe to publish again), and True
    when that cannot be known (a timeout or a lost connection: the broker may
    have stored it and its receipt got lost; publish again only if a duplicate
    is acceptable, or use `sequence_id` with deduplication).
    """

    def __init__(self, topic: str, result: _pulsar.Result | str, detail: str = "", *, maybe_stored: bool | None = None) -> None:
        self.topic = topic
        self.result = result
        name = result.name if isinstance(result, _pulsar.Result) else str(result)
        self.maybe_stored = name not in NOT_STORED if maybe_stored is None else maybe_stored
        hint = _HINTS.get(name, "")
        super().__init__(f"publish to {topic} failed: {name}{': ' + detail if detail else ''}{hint}")


class PublishBatchError(EventBusError):
    """Some messages of a `publish_batch` were not confirmed.

    `failures` maps the index of every failed payload to its error; `message_ids`
    holds the id of every confirmed one (None where it failed).
    """

    def __init__(self, topic: str, failures: dict[int, BaseException], message_ids: Sequence[object]) -> None:
        self.topic = topic
        self.failures = failures
        self.message_ids = list(message_ids)
        first = ", ".join(f"#{i}: {e}" for i, e in list(failures.items())[:3])
        super().__init__(
            f"{len(failures)} of {len(self.message_ids)} messages to {topic} were not confirmed ({first}"
            f"{', ...' if len(failures) > 3 else ''})"
        )


#: Results that mean the message was not stored: refused by the client before
#: sending, or by the broker instead of storing it. Any other result (Timeout,
#: AlreadyClosed, a lost connection) leaves it unknown.
NOT_STORED = frozenset(
    {
        "BusClosed",
        "MessageTooBig",
        "InvalidMessage",
        "ProducerQueueIsFull",
        "ChecksumError",
        "TopicTerminated",
        "ProducerBlockedQuotaExceededError",
        "ProducerBlockedQuotaExceededException",
    }
)

_HINTS = {
    "MessageTooBig": " (the payload is larger than the broker's maximum message size, 5 MB by default)",
    "Timeout": " (no confirmation within the send timeout; is the broker up?)",
    "AuthenticationError": " (authentication failed: check EVENTBUS_TOKEN)",
    "AuthorizationError": " (the token's role may not publish to this topic)",
    "AlreadyClosed": " (the producer was closed with this message unconfirmed)",
    "BusClosed": " (the bus is closed: publish before `close()`, or open a new EventBus)",
}
