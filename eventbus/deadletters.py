"""Dead letters read back (`eventbus dlq show`) and sent back to the one group they failed in (`eventbus dlq replay`)."""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio

from .client import Consumer, MessageId, RawMessage, id_text, ident_of, key_of
from .connect import connect
from .errors import ConfigError, EventBusError
from .handling import DEAD_LETTER_PROPERTIES, REPLAY_SUBSCRIPTION
from .producers import Producers
from .registry import dead_letter_topic, retry_topic
from .settings import Settings

#: Says on a replayed message where it came from: ``<dead-letter topic>@<its id there>``.
REPLAYED_FROM = "eventbus-replayed-from"
#: How long a replay waits for the next dead letter before it counts the topic as read to its end.
_QUIET_MS = 500


@dataclass(frozen=True)
class DeadLetter:
    """A message on a dead-letter topic: why it is there, and the message as it was published."""

    message_id: str
    publish_time: datetime | None
    key: str | bytes | None
    reason: str
    error_type: str
    error: str
    attempts: int
    original_topic: str
    original_message_id: str
    data: bytes
    #: The original message's properties (the `eventbus-` dead-letter ones taken out).
    properties: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: RawMessage) -> DeadLetter:
        try:
            written = dict(raw.properties())
        except UnicodeDecodeError:
            written = {}
        attempts = written.get("eventbus-attempts", "")
        millis = raw.publish_timestamp()
        return cls(
            message_id=id_text(raw.message_id()),
            publish_time=datetime.fromtimestamp(millis / 1000, tz=timezone.utc) if millis > 0 else None,
            key=key_of(raw) or None,
            reason=written.get("eventbus-dlq-reason", "?"),
            error_type=written.get("eventbus-error-type", "?"),
            error=written.get("eventbus-error", ""),
            attempts=int(attempts) if attempts.isdigit() else 0,
            original_topic=written.get("eventbus-original-topic", "?"),
            original_message_id=written.get("eventbus-original-message-id", "?"),
            data=raw.data(),
            properties={k: v for k, v in written.items() if k not in DEAD_LETTER_PROPERTIES},
        )

    def preview(self, width: int = 60) -> str:
        text = self.data[: width * 4].decode("utf-8", "backslashreplace")
        return text if len(text) <= width else text[: width - 3] + "..."

    def as_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "publish_time": self.publish_time.isoformat() if self.publish_time else None,
            "key": self.key.decode("utf-8", "backslashreplace") if isinstance(self.key, bytes) else self.key,
            "reason": self.reason,
            "error_type": self.error_type,
            "error": self.error,
            "attempts": self.attempts,
            "original_topic": self.original_topic,
            "original_message_id": self.original_message_id,
            "properties": self.properties,
            "preview": self.preview(),
        }


def topics(settings: Settings, topic: str, group: str) -> tuple[str, str]:
    """The dead-letter topic of `group` on `topic`, and its retry topic (as `Subscription` names them)."""
    if not group.strip():
        raise ConfigError("the group is empty: name the group whose dead letters to read")
    full = settings.topic(topic)
    return dead_letter_topic(full, group), retry_topic(full, group)


async def show(settings: Settings, topic: str, group: str, limit: int | None = None) -> list[DeadLetter]:
    """The dead letters of `group` on `topic`, oldest first, read without moving any subscription."""
    [found] = await show_many(settings, [(topic, group)], limit)
    return found


async def show_many(
    settings: Settings, subscriptions: Sequence[tuple[str, str]], limit: int | None = None
) -> list[list[DeadLetter]]:
    """`show` for each (topic, group), over one connection."""
    connection = await connect(settings)
    by_subscription = connection.profile.reads_by_subscription
    try:
        return [
            [DeadLetter.of(raw) for raw in await connection.client.read(dead, limit, by_subscription=by_subscription)]
            for dead, _ in (topics(settings, t, g) for t, g in subscriptions)
        ]
    finally:
        await connection.close()


def sequence_id(message_id: MessageId) -> int | None:
    """A sequence id that grows with the dead letter's position, so a resend after a crash is deduplicated.

    Ledger, entry and batch index packed in 63 bits; None where one does not fit.
    """
    ledger, entry, batch = int(message_id.ledger_id()), int(message_id.entry_id()), int(message_id.batch_index()) + 1
    if not (0 <= ledger < 1 << 31 and 0 <= entry < 1 << 20 and 0 <= batch < 1 << 12):
        return None
    return (ledger << 32) | (entry << 12) | batch


@dataclass
class ReplayReport:
    """What a replay did: replayed (with the new id; None on a dry run), skipped by the filter, failed."""

    dead_letter_topic: str
    retry_topic: str
    replayed: list[tuple[DeadLetter, str | None]] = field(default_factory=list)
    skipped: int = 0
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)


async def replay(
    settings: Settings,
    topic: str,
    group: str,
    *,
    error_type: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[DeadLetter, str | None], None] | None = None,
) -> ReplayReport:
    """Send `group`'s dead letters back to `group` alone (its retry topic), up to the last one there now.

    Each is acknowledged on the durable `eventbus-replay` subscription only after the broker
    confirmed its resend, so a replay stopped half way and run again resends the rest; with
    deduplication on the namespace, a resend of one already confirmed is dropped by the broker
    (its sequence id is its dead-letter position). A dry run sends and acknowledges nothing.
    """
    dead_letters, retries = topics(settings, topic, group)
    report = ReplayReport(dead_letters, retries)
    # One producer name per filter: deduplication needs its sequence ids to grow, and a filtered
    # replay skips dead letters that a later unfiltered one sends.
    name = f"eventbus-replay-{group}" + (f"-{error_type}" if error_type else "")
    settings = settings.model_copy(update={"producer_name": name})
    connection = await connect(settings)
    profile = connection.profile
    lease = profile.lease(dead_letters, REPLAY_SUBSCRIPTION)
    if lease is not None and not lease.acquire():
        await connection.close()
        raise EventBusError(f"another replay of {dead_letters} is running: wait for it to finish")
    producers = Producers(connection.client, settings, connection.bridge)
    try:
        try:
            # The producer first: its name is the replay's, and Apache Pulsar lets one producer hold a name.
            await producers.get(retries)
        except EventBusError as exc:
            if exc.result == "ProducerBusy":
                raise EventBusError(f"another replay of {dead_letters} is running: wait for it to finish") from None
            raise
        # Shared, as the worker's own keeping subscription (`Producers.retain`) is: the type may not differ
        # while a consumer is connected, and a worker may dead-letter during a replay.
        consumer = await connection.client.subscribe(
            dead_letters,
            REPLAY_SUBSCRIPTION,
            subscription_type="shared",
            initial_position="earliest",
            receiver_queue_size=100,
            consumer_name=f"{socket.gethostname()}-{os.getpid()}-replay",
            batch_index_ack=profile.batch_index_ack,
        )
        try:
            last = await consumer.last_message_id()
            end = (last.ledger_id(), last.entry_id())
            if end[0] >= 0 and end[1] >= 0:
                await _replay_to(end, consumer, producers, report, error_type, limit, dry_run, progress)
        finally:
            await consumer.close()
    finally:
        await producers.close()
        if lease is not None:
            lease.release()
        await connection.close()
    return report


async def _replay_to(
    end: tuple[int, int],
    consumer: Consumer,
    producers: Producers,
    report: ReplayReport,
    error_type: str | None,
    limit: int | None,
    dry_run: bool,
    progress: Callable[[DeadLetter, str | None], None] | None,
) -> None:
    acks: collections.deque[RawMessage] = collections.deque()
    while True:
        # The consumer's receive blocks: a thread of its own, as the worker's.
        batch: list[RawMessage] = await anyio.to_thread.run_sync(consumer.receive, 100, _QUIET_MS)
        if not batch:
            return  # nothing more: every dead letter up to the end was sent, or acknowledged before
        for raw in batch:
            ident = ident_of(raw)
            if (ident[1], ident[2]) > end:
                return  # dead-lettered after the replay began (a replayed one failing again, say)
            dead = DeadLetter.of(raw)
            if error_type is not None and dead.error_type != error_type:
                report.skipped += 1
                continue
            if limit is not None and len(report.replayed) >= limit:
                return
            new_id: str | None = None
            if not dry_run:
                properties = dict(dead.properties)
                properties[REPLAYED_FROM] = f"{report.dead_letter_topic}@{dead.message_id}"
                event_time = raw.event_timestamp()
                try:
                    sent = await producers.send(
                        report.retry_topic, dead.data, key=dead.key, properties=properties,
                        event_time=event_time or None, sequence_id=sequence_id(raw.message_id()),
                    )
                except EventBusError as exc:
                    report.failed.append((dead, str(exc)))  # not acknowledged: the next replay tries it again
                    continue
                new_id = id_text(sent)
                acks.append(raw)
                consumer.acknowledge(acks)
            report.replayed.append((dead, new_id))
            if progress is not None:
                progress(dead, new_id)
