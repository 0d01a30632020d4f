"""Sending a subscription's dead letters: kept by the replay subscription, retried until stored or the bus stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from ..broker.client import MessageId, RawMessage, id_text, key_of
from ..errors import text
from ..observing.tracing import Tracing
from ..topics import REPLAY_SUBSCRIPTION
from .deadlines import sleep_unless
from .reporting import Report, Sent

log = logging.getLogger("eventbus")


class Sender(Protocol):
    """Where dead letters go: bytes as they are, with their key and properties, kept by a subscription."""

    async def send(
        self, topic: str, data: bytes, *, key: str | bytes | None, properties: Mapping[str, str],
        event_time: int | None = None,
    ) -> MessageId: ...

    async def retain(self, topic: str, subscription: str) -> None: ...


class DeadLetterer:
    """Sends one subscription's dead letters to `topic`."""

    def __init__(
        self, sender: Sender, topic: str, *, tracing: Tracing | None, report: Report, stopped: asyncio.Event,
        backoff: tuple[float, float],
    ) -> None:
        """`stopped`: set when the bus hands out no more messages (a send retrying then gives up: redelivered)."""
        self.topic = topic
        self._sender = sender
        self._tracing = tracing
        self._report = report
        self._stopped = stopped
        self._backoff = backoff
        #: Dead-letter publishes that failed and were retried (the message's key waits meanwhile).
        self.failures = 0

    async def send(self, message: RawMessage, properties: dict[str, str], reason: str) -> Sent | None:
        """Send until the broker stores it; None when the bus stopped first (left unacknowledged)."""
        delay, most = self._backoff
        while True:
            try:
                # Before the first dead letter: without a subscription Apache Pulsar would not keep it.
                await self._sender.retain(self.topic, REPLAY_SUBSCRIPTION)
                return await self._send(message, properties, reason)
            except Exception as exc:
                # Not acknowledged until it is safely dead-lettered; the key waits.
                self.failures += 1
                self._report.dead_letter_failed()
                log.error(
                    "cannot dead-letter message %s to %s (retrying in %.1fs): %s", id_text(message.message_id()),
                    self.topic, delay, text(exc),
                )
                if await sleep_unless(self._stopped, delay):
                    return None
                delay = min(delay * 2, most)

    async def _send(self, message: RawMessage, properties: dict[str, str], reason: str) -> Sent:
        # The original's event time goes with it (it was 0 on every dead letter, and so on every replayed copy).
        key, event_time = key_of(message) or None, message.event_timestamp() or None
        if self._tracing is None:
            sent = await self._sender.send(self.topic, message.data(), key=key, properties=properties, event_time=event_time)
            return Sent(self.topic, properties, sent)
        with self._tracing.send(self.topic, properties, **{"eventbus.dlq.reason": reason}) as (_, traced):
            sent = await self._sender.send(self.topic, message.data(), key=key, properties=traced, event_time=event_time)
        return Sent(self.topic, traced, sent)
