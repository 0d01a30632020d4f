"""What a handler's return value becomes: a publish to its `returns_to` topic, a reply to a request, or a warning."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from ..broker.client import RawMessage, key_of, properties_of
from ..errors import detail, text
from ..topics import REPLY_TO
from .handler import Publisher

log = logging.getLogger("eventbus")

#: On a request: the id its reply carries back (`REPLY_TO`, from topics, names where the reply goes).
CORRELATION_ID = "eventbus-correlation-id"
#: On a reply that reports a failure instead of a value: the reason (as a dead letter's), the error's type and text.
REPLY_FAILED = "eventbus-reply-failed"
REPLY_ERROR_TYPE = "eventbus-reply-error-type"
REPLY_ERROR = "eventbus-reply-error"
#: A requesting bus's reply topic is this prefix and 16 hex digits, in its namespace (publishing/requester.py).
REPLY_TOPIC_PREFIX = "eventbus-replies-"
_REPLY_TOPIC = re.compile(r"persistent://[^/]+/[^/]+/" + REPLY_TOPIC_PREFIX + r"[0-9a-f]{16}")
_CORRELATION = re.compile(r"[0-9a-f]{32}")


class Answers:
    """Where one subscription's return values go; made only for a handler that may return something, or has
    `returns_to`."""

    def __init__(self, name: str, bus: Publisher, returns_to: str | None, may_return: bool, topic: str) -> None:
        """`may_return`: the handler is not annotated `-> None`, so a request it handles gets a reply (even None).
        `topic`: the subscription's full topic; replies go only to reply topics in its tenant and namespace."""
        self._name, self._bus, self._returns_to = name, bus, returns_to
        #: Whether a None result still needs a look for a reply address.
        self.always = may_return
        self._namespace = topic.rsplit("/", 1)[0] + "/"
        self._warned = self._warned_address = False

    def reply_address(self, properties: Mapping[str, str]) -> tuple[str, str] | None:
        """(reply topic, correlation id) of a message a `bus.request` made, else None.

        Anyone who may produce to a topic can set these properties: only a bus's own reply topic in this
        subscription's namespace, with a correlation id of its form, is answered, never another tenant's topic,
        a retry or dead-letter topic, or anything else (said once per handler).
        """
        reply_to = properties.get(REPLY_TO)
        if reply_to is None:
            return None
        correlation = properties.get(CORRELATION_ID, "")
        ours = _REPLY_TOPIC.fullmatch(reply_to) and reply_to.startswith(self._namespace)
        if ours and _CORRELATION.fullmatch(correlation):
            return reply_to, correlation
        if not self._warned_address:
            self._warned_address = True
            log.warning(
                "%s ignored the reply address %r of a message no bus.request in %s made: replies go only to "
                "%s<id> topics there (said once per handler)",
                self._name, reply_to[:200], self._namespace.rstrip("/"), REPLY_TOPIC_PREFIX,
            )
        return None

    async def send(self, result: Any, message: RawMessage) -> None:
        """Publish `result` to `returns_to`, then as the reply to a request; raises what the publish raises (the
        attempt then fails and is retried: the message is acknowledged only once its outputs are stored, and a
        requester hears of success only once they are)."""
        address = self.reply_address(properties_of(message) or {})
        if result is not None and self._returns_to is not None:
            await self._bus.publish(self._returns_to, result, key=key_of(message) or None)
        if address is not None:
            reply_to, correlation = address
            await self._bus.publish(reply_to, result, properties={CORRELATION_ID: correlation})
            log.debug("%s replied to request %s on %s", self._name, correlation, reply_to)
        if result is None or self._returns_to is not None:
            return
        if address is None and not self._warned:
            self._warned = True
            log.warning(
                "%s returned a %s, which goes nowhere: give its @subscribe returns_to='topic' to publish it, or "
                "return None (said once per handler)", self._name, type(result).__name__,
            )

    async def failed(self, message: RawMessage, reason: str, exc: BaseException) -> None:
        """Tell a waiting requester its request was dead-lettered (or dropped), and why; never raises."""
        address = self.reply_address(properties_of(message) or {})
        if address is None:
            return
        reply_to, correlation = address
        failure = {
            CORRELATION_ID: correlation, REPLY_FAILED: reason,
            REPLY_ERROR_TYPE: type(exc).__name__, REPLY_ERROR: detail(exc)[:1000],
        }
        try:
            await self._bus.publish(reply_to, None, properties=failure)
            log.debug("%s told request %s on %s it failed (%s)", self._name, correlation, reply_to, reason)
        except Exception as error:  # the requester times out instead
            log.warning("%s could not tell the requester on %s of the failure: %s", self._name, reply_to, text(error))
