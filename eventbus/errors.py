"""Exceptions the bus raises to its users, with one classification of the client's failures."""

from __future__ import annotations

import re

import enum
from collections.abc import Sequence
from typing import ClassVar


class EventBusError(Exception):
    """Base of the errors this package raises; `exit_code` is what the CLI exits with."""

    exit_code: ClassVar[int] = 1
    #: The client's result name when the broker or the client refused ("ConsumerBusy", "Timeout", ...).
    result: str | None = None
    #: What the CLI shows above the error's one line: the traceback of the user's code that failed, if any.
    details: str = ""


class ConfigError(EventBusError):
    """Settings, handler modules or options that cannot work; waiting will not help."""

    exit_code = 2


class BrokerUnavailable(EventBusError):
    """The broker could not be reached, or cannot do it now; waiting may help."""


class AuthenticationFailed(ConfigError):
    """The broker rejected the token (or wants one)."""


class SubscriptionFailed(EventBusError):
    """A subscription died of something the bus did not expect; `run()` raises it after draining the rest."""


class StartupFailed(EventBusError):
    """A lifespan or an app-scoped dependency raised while the worker started: nothing was consumed.

    `details` holds its traceback; the CLI prints it above the one line and exits 1.
    """


class RequestTimeout(EventBusError):
    """No reply to `EventBus.request` within its timeout (the request itself was stored: it may still be handled)."""


class RequestFailed(EventBusError):
    """The request's handler gave up on it: `reason` is ``refused`` (it raised `Refuse`), or the dead-letter reason
    (``handler-failed``, ``rejected``, ...); `error_type` and `error` say why.

    >>> RequestFailed("pricing", reason="refused", error_type="Refuse", error="out of stock")
    """

    def __init__(self, topic: str = "", reason: str = "handler-failed", error_type: str = "", error: str = "") -> None:
        self.topic, self.reason, self.error_type, self.error = topic, reason, error_type, error
        super().__init__(f"request to {topic} failed ({reason}): {error_type}: {error}")


class BatchFailed(Exception):
    """Raise it from a batch handler to fail only some of the batch: `failures` maps each failed index (in the
    list the handler was given) to its exception. Those are retried (then dead-lettered, or at once for a
    `Reject`) as single messages would be; the rest are acknowledged.

    >>> raise BatchFailed({3: ValueError("bad sku"), 7: Reject("duplicate order")})
    """

    def __init__(self, failures: dict[int, BaseException]) -> None:
        self.failures = dict(failures)
        super().__init__(f"{len(self.failures)} of the batch failed: indexes {sorted(map(repr, self.failures))}")

    def problem(self, size: int) -> str | None:
        """What makes `failures` unusable for a batch of `size` (the whole batch then fails with it), or None.

        Each key must be an index of the batch (an `int`, not a `bool`) and each value the exception of that item:
        anything else would acknowledge an item the handler meant as failed, or fail one it did not name.
        """
        if not self.failures:
            return "BatchFailed({}) names no failed item: raise it with {index: exception}, or return normally"
        keys = [k for k in self.failures if type(k) is not int or not 0 <= k < size]
        if keys:
            return f"BatchFailed names {keys!r}, not indexes (0 to {size - 1}) of this batch of {size}: fix the handler"
        values = {k: v for k, v in self.failures.items() if not isinstance(v, BaseException)}
        if values:
            return (
                f"BatchFailed maps {', '.join(f'{k}: {v!r}' for k, v in values.items())}: each value must be the "
                "exception of that item, e.g. BatchFailed({3: ValueError('bad sku')}): fix the handler"
            )
        return None


class Refuse(Exception):
    """Raise it from a handler to say no, as a business answer rather than a failure: the message is acknowledged,
    not retried and not dead-lettered; the refusal is counted and logged at INFO, and a requester gets
    `RequestFailed` with ``reason="refused"`` and this text.

    >>> raise Refuse("out of stock")
    """


class Reject(Exception):
    """Raise it from a handler when retrying cannot help: the message goes to the dead-letter topic at once.

    >>> raise Reject("card declined")   # eventbus-dlq-reason: rejected, eventbus-error: card declined
    """


class PublishError(EventBusError):
    """The broker did not confirm a message.

    `result` names the client's outcome ("Timeout", "MessageTooBig", "BusClosed", ...).
    `maybe_stored` is False when the message was certainly not stored (the bus
    or the broker refused it before storing: safe to publish again), and True
    when that cannot be known (a timeout or a lost connection: the broker may
    have stored it and its receipt got lost; publish again only if a duplicate
    is acceptable, or use `sequence_id` with deduplication).
    """

    def __init__(self, topic: str, result: str, detail: str = "", *, maybe_stored: bool | None = None) -> None:
        self.topic = topic
        self.result = result
        self.maybe_stored = result not in NOT_STORED if maybe_stored is None else maybe_stored
        hint = _HINTS.get(result, "")
        super().__init__(f"publish to {topic} failed: {result}{': ' + detail if detail else ''}{hint}")


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


class Failure(enum.Enum):
    """What a failed client call means for whoever retries it."""

    TRANSIENT = "transient"  # waiting can cure it: a timeout, a busy or restarting broker
    FINAL = "final"  # this message or call can never succeed; others may
    AUTHENTICATION = "authentication"  # the token is wrong or missing
    CONFIGURATION = "configuration"  # the settings or names ask for something the broker refuses


_CLASSES = {
    Failure.AUTHENTICATION: frozenset({"AuthenticationError"}),
    Failure.CONFIGURATION: frozenset(
        {"AuthorizationError", "InvalidTopicName", "InvalidConfiguration", "NotAllowedError", "InvalidUrl",
         "TopicNotFound", "SubscriptionNotFound", "IncompatibleSchema", "UnsupportedVersionError"}
    ),
    Failure.FINAL: frozenset(
        {"BusClosed", "MessageTooBig", "InvalidMessage", "ChecksumError", "TopicTerminated",
         "ProducerBlockedQuotaExceededError", "ProducerBlockedQuotaExceededException", "UnknownId"}
    ),
}


def classify(result: str) -> Failure:
    """The failure class of a client result name (anything unknown counts as transient)."""
    for failure, names in _CLASSES.items():
        if result in names:
            return failure
    return Failure.TRANSIENT


def broker_error(what: str, result: str, detail: str, topic: str | None = None) -> EventBusError:
    """The error to raise when the broker refused `what` (on `topic`), by the class of its result."""
    failure = classify(result)
    text = f"{what}: {detail or result}"
    if result == "IncompatibleSchema":
        text = f"{what}: IncompatibleSchema: {_java_reason(detail)}{_SCHEMA_HINT}"
    if result == "TopicNotFound" and topic and topic.count("/") == 4:
        tenant, namespace = topic.split("/")[2:4]
        text += (
            f" (does the namespace {tenant}/{namespace} exist? Create it with "
            f"`pulsar-admin namespaces create {tenant}/{namespace}`, or set EVENTBUS_TENANT and EVENTBUS_NAMESPACE)"
        )
    error: EventBusError
    if failure is Failure.AUTHENTICATION:
        error = AuthenticationFailed(text + " (authentication failed: check the token, EVENTBUS_TOKEN)")
    elif failure is Failure.CONFIGURATION:
        hint = " (the token's role is not allowed to do this)" if result == "AuthorizationError" else ""
        error = ConfigError(text + hint)
    else:
        error = BrokerUnavailable(text)
    error.result = result
    return error


_SCHEMA_HINT = (
    " (the topic's registered schema and this producer's disagree: declare the model the topic carries with "
    "Router.publisher(topic, Model) so the bus registers its schema, or change the namespace's schema policy)"
)


def _java_reason(detail: str) -> str:
    """The broker's reason once, on one line: without the Java exception classes, the repeated `caused by` chain
    and the schema definitions it quotes."""
    first = re.sub(r"\s*\{.*", "", detail.split(" caused by ")[0], flags=re.S).rstrip(": ")  # the definitions too
    return re.sub(r"(?:\b[a-z_]\w*\.)+[A-Z]\w*(?:Exception|Error): ", "", first).removeprefix("IncompatibleSchema: ")


#: Results that mean the message was not stored: refused by the client before
#: sending, or by the broker instead of storing it. Any other result (Timeout,
#: AlreadyClosed, a lost connection, UnknownId) leaves it unknown.
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


def detail(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException:
        return "<str() of the exception raised>"


def text(exc: BaseException) -> str:
    """``Type: message`` for any exception."""
    message = detail(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
