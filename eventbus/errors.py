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


class PublishError(EventBusError):
    """The broker did not confirm a message; it may or may not have been stored."""

    def __init__(self, topic: str, result: _pulsar.Result | str, detail: str = "") -> None:
        self.topic = topic
        self.result = result
        name = result.name if isinstance(result, _pulsar.Result) else str(result)
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


_HINTS = {
    "MessageTooBig": " (the payload is larger than the broker's maximum message size, 5 MB by default)",
    "Timeout": " (no confirmation within the send timeout; is the broker up?)",
    "AuthenticationError": " (authentication failed: check EVENTBUS_TOKEN)",
    "AuthorizationError": " (the token's role may not publish to this topic)",
    "AlreadyClosed": " (the bus is shutting down)",
}
