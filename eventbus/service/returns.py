"""What a handler's return value becomes: a publish to its `returns_to` topic, a reply to a request, or a warning."""

from __future__ import annotations

import logging
from typing import Any

from ..broker.client import RawMessage, key_of, properties_of
from ..errors import detail, text
from .handler import Publisher

log = logging.getLogger("eventbus")

#: On a request: the topic its reply goes to, and the id the reply carries back.
REPLY_TO = "eventbus-reply-to"
CORRELATION_ID = "eventbus-correlation-id"
#: On a reply that reports a failure instead of a value: the reason (as a dead letter's), the error's type and text.
REPLY_FAILED = "eventbus-reply-failed"
REPLY_ERROR_TYPE = "eventbus-reply-error-type"
REPLY_ERROR = "eventbus-reply-error"


class Answers:
    """Where one subscription's return values go; made only for a handler that may return something, or has
    `returns_to`."""

    def __init__(self, name: str, bus: Publisher, returns_to: str | None, may_return: bool) -> None:
        """`may_return`: the handler is not annotated `-> None`, so a request it handles gets a reply (even None)."""
        self._name, self._bus, self._returns_to = name, bus, returns_to
        #: Whether a None result still needs a look for a reply address.
        self.always = may_return
        self._warned = False

    async def send(self, result: Any, message: RawMessage) -> None:
        """Publish `result` to `returns_to` and as the reply to a request; raises what the publish raises (the
        attempt then fails and is retried: the message is acknowledged only once its outputs are stored)."""
        properties = properties_of(message) or {}
        reply_to = properties.get(REPLY_TO)
        if reply_to:
            await self._bus.publish(reply_to, result, properties={CORRELATION_ID: properties.get(CORRELATION_ID, "")})
        if result is None:
            return
        if self._returns_to is not None:
            await self._bus.publish(self._returns_to, result, key=key_of(message) or None)
        elif not reply_to and not self._warned:
            self._warned = True
            log.warning(
                "%s returned a %s, which goes nowhere: give its @subscribe returns_to='topic' to publish it, or "
                "return None (said once per handler)", self._name, type(result).__name__,
            )

    async def failed(self, message: RawMessage, reason: str, exc: BaseException) -> None:
        """Tell a waiting requester its request was dead-lettered (or dropped), and why; never raises."""
        properties = properties_of(message) or {}
        reply_to = properties.get(REPLY_TO)
        if not reply_to:
            return
        failure = {
            CORRELATION_ID: properties.get(CORRELATION_ID, ""), REPLY_FAILED: reason,
            REPLY_ERROR_TYPE: type(exc).__name__, REPLY_ERROR: detail(exc)[:1000],
        }
        try:
            await self._bus.publish(reply_to, None, properties=failure)
        except Exception as error:  # the requester times out instead
            log.warning("%s could not tell the requester on %s of the failure: %s", self._name, reply_to, text(error))
