"""Dead letters read back (`eventbus dlq show`) and sent back to the one group they failed in (`eventbus dlq replay`)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio

from ..broker.client import (
    Consumer,
    LastEntry,
    MessageId,
    RawMessage,
    build_message,
    id_text,
    key_of,
    properties_of,
    stored,
)
from ..broker.connect import Connection, connect
from ..errors import ConfigError, EventBusError
from ..publishing.producers import Producers, TopicProducer
from ..settings import Settings
from ..service.returns import CORRELATION_ID
from ..topics import DEAD_LETTER_PROPERTIES, REPLAY_SUBSCRIPTION, REPLAYED_FROM, REPLY_TO, dead_letter_topic, retry_topic

log = logging.getLogger("eventbus")
#: How long a replay or `show` waits for the next dead letter before it counts the topic as read to its end.
_QUIET_MS = 1000
#: Seconds a replay waits for its producer to close.
_CLOSE_WAIT = 5.0


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
    #: Sent back by a replay already (`show(..., every=True)` lists those too).
    replayed: bool = False
    #: Not written by the bus (no `eventbus-dlq-reason`): Java's `DeadLetterPolicy` shares the topic names.
    foreign: bool = False

    @classmethod
    def of(cls, raw: RawMessage) -> DeadLetter:
        written = properties_of(raw) or {}
        attempts = written.get("eventbus-attempts", "")
        foreign = "eventbus-dlq-reason" not in written
        millis = raw.publish_timestamp()
        return cls(
            message_id=id_text(raw.message_id()),
            publish_time=datetime.fromtimestamp(millis / 1000, tz=timezone.utc) if millis > 0 else None,
            key=key_of(raw) or None,
            reason=written.get("eventbus-dlq-reason", "not-eventbus" if foreign else "?"),
            error_type=written.get("eventbus-error-type", "?"),
            error=written.get("eventbus-error", ""),
            attempts=int(attempts) if attempts.isdigit() else 0,
            original_topic=written.get("eventbus-original-topic", written.get("REAL_TOPIC", "?")),
            original_message_id=written.get("eventbus-original-message-id", written.get("ORIGIN_MESSAGE_ID", "?")),
            data=raw.data(),
            properties={k: v for k, v in written.items() if k not in DEAD_LETTER_PROPERTIES},
            foreign=foreign,
        )

    @property
    def request(self) -> bool:
        """A `bus.request`'s message: its requester was told of the failure and waits no more."""
        return REPLY_TO in self.properties

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
            "replayed": self.replayed,
            "foreign": self.foreign,
        }


def topics(settings: Settings, topic: str, group: str) -> tuple[str, str]:
    """The dead-letter topic of `group` on `topic`, and its retry topic (as `Subscription` names them)."""
    if not group.strip():
        raise ConfigError("the group is empty: name the group whose dead letters to read")
    full = settings.topic(topic)
    return dead_letter_topic(full, group), retry_topic(full, group)


async def show(
    settings: Settings, topic: str, group: str, limit: int | None = None, *, every: bool = False
) -> list[DeadLetter]:
    """The dead letters of `group` on `topic` no replay has sent back, oldest first (`every`: all, marked).

    Nothing moves: the waiting ones are read through the replay subscription and left unacknowledged.
    """
    [found] = await show_many(settings, [(topic, group)], limit, every=every)
    return found


async def show_many(
    settings: Settings, subscriptions: Sequence[tuple[str, str]], limit: int | None = None, *, every: bool = False
) -> list[list[DeadLetter]]:
    """`show` for each (topic, group), over one connection."""
    connection = await connect(settings)
    try:
        return [
            await _listed(connection, dead, retries, limit, every)
            for dead, retries in (topics(settings, t, g) for t, g in subscriptions)
        ]
    finally:
        await connection.close()


async def _listed(
    connection: Connection, dead_letters: str, retries: str, limit: int | None, every: bool
) -> list[DeadLetter]:
    stored = await _stored(connection, dead_letters)
    if not any(not d.foreign for d in stored):
        return stored[:limit]  # none of ours (empty, or Java's alone): never a subscription of ours on it
    marks = await _replayed(connection, dead_letters, retries)
    async with _replay_subscription(connection, dead_letters) as consumer:
        # A replay's acknowledgement of part of a batch may not reach the broker (the client acknowledges
        # a batch whole unless the broker takes batch-index acks): what the retry topic holds is replayed.
        waiting = {d.message_id: d async for d in _dead_letters(_waiting(consumer)) if marks.copy_of(d) is None}
    if marks.untrusted:
        log.warning(marks.warning())
    if not every:
        return list(waiting.values())[:limit]
    return [dataclasses.replace(d, replayed=d.message_id not in waiting) for d in stored[:limit]]


async def _stored(connection: Connection, dead_letters: str) -> list[DeadLetter]:
    """Every letter `dead_letters` holds, read without a subscription.

    A topic the bus never wrote to (Java's `DeadLetterPolicy` shares the name) is only ever read so: a
    durable replay subscription there would acknowledge nothing and keep the other client's letters for good.
    """
    reads_by_subscription = connection.profile.reads_by_subscription
    return [DeadLetter.of(raw) for raw in await connection.client.read(dead_letters, None, by_subscription=reads_by_subscription)]


async def _dead_letters(raws: AsyncIterator[RawMessage]) -> AsyncIterator[DeadLetter]:
    async for raw in raws:
        yield DeadLetter.of(raw)


def _fingerprint(key: str | bytes | None, data: bytes) -> bytes:
    """A digest of what a replay copies: the key and the payload."""
    tagged = b"s" + key.encode() if isinstance(key, str) else b"b" + key if key else b"n"
    return hashlib.blake2b(tagged + b"\x00" + data, digest_size=16).digest()


@dataclass
class ReplayMarks:
    """The copies replays stored on a retry topic, each trusted only as the dead letter it names.

    Whoever may produce on the namespace can write ``eventbus-replayed-from`` on the retry topic: a
    marker counts only when its key and payload are the named dead letter's (then that message is on
    the retry topic, whoever wrote it); any other is ignored and counted in `untrusted`.
    """

    dead_letters: str
    retries: str
    #: ``<dead-letter topic>@<id>`` -> each copy marked so: its fingerprint and its id on the retry topic.
    marked: dict[str, list[tuple[bytes, str]]] = field(default_factory=dict)
    untrusted: int = 0

    def copy_of(self, dead: DeadLetter) -> str | None:
        """The id of `dead`'s copy on the retry topic, if one is stored there."""
        copies = self.marked.get(f"{self.dead_letters}@{dead.message_id}")
        if not copies:
            return None
        fingerprint = _fingerprint(dead.key, dead.data)
        trusted = next((at for mark, at in copies if mark == fingerprint), None)
        if trusted is None:
            self.untrusted += len(copies)
        return trusted

    def warning(self) -> str:
        return (
            f"{self.untrusted} message(s) on {self.retries} name a dead letter in {REPLAYED_FROM} but are not "
            "its copy (another key or payload): ignored, the dead letter still waits; someone who may produce "
            "on this namespace wrote them"
        )


async def _replayed(connection: Connection, dead_letters: str, retries: str) -> ReplayMarks:
    """What replays (or anyone) stored on the retry topic naming a dead letter."""
    marks = ReplayMarks(dead_letters, retries)
    for raw in await connection.client.read(retries, None, by_subscription=connection.profile.reads_by_subscription):
        origin = (properties_of(raw) or {}).get(REPLAYED_FROM)
        if origin is not None:
            copy = (_fingerprint(key_of(raw) or None, raw.data()), id_text(raw.message_id()))
            marks.marked.setdefault(origin, []).append(copy)
    return marks


#: pulsar-lite 0.2, now and then, keeps the consumer of a replay that was SIGKILLed (a test saw it for over 170 s) and
#: drops the connection of the next replay's consumer, which has the same consumer id there.
_STALE_REPLAY = (
    "the embedded broker may still hold the consumer of a replay that was killed; stop every process using "
    "EVENTBUS_DATA_DIR (the broker stops with the last one, and forgets it), then run the replay again"
)


@contextlib.asynccontextmanager
async def _replay_subscription(connection: Connection, dead_letters: str) -> AsyncIterator[Consumer]:
    """The replay subscription, held: one replay (or `show`) of a dead-letter topic at a time.

    Apache Pulsar holds the lock (an exclusive consumer, gone with its process); the embedded
    broker's shared one is held under its lease.
    """
    busy = f"another replay of {dead_letters} is running: wait for it to finish"
    profile = connection.profile
    lease = profile.lease(dead_letters, REPLAY_SUBSCRIPTION)
    if lease is not None and not lease.acquire():
        raise EventBusError(busy)
    try:
        try:
            consumer = await connection.client.subscribe(
                dead_letters, REPLAY_SUBSCRIPTION, subscription_type=profile.replay_subscription_type,
                initial_position="earliest", receiver_queue_size=100,
                consumer_name=f"{socket.gethostname()}-{os.getpid()}-replay", batch_index_ack=profile.batch_index_ack,
            )
        except EventBusError as exc:
            if exc.result == "ConsumerBusy":
                raise EventBusError(busy) from None
            if lease is not None and exc.result == "Timeout":
                raise EventBusError(f"{exc}: {_STALE_REPLAY}") from exc
            raise
        try:
            yield consumer
        finally:
            await consumer.close()
    finally:
        if lease is not None:
            lease.release()


async def _waiting(consumer: Consumer) -> AsyncGenerator[RawMessage, None]:
    """The subscription's unacknowledged messages, oldest first, up to the topic's last one now.

    It ends once it has every message of the last stored entry, when those are unacknowledged;
    otherwise when nothing more came for `_QUIET_MS` (the broker sends what a new consumer may have at once).
    """
    end = LastEntry(await consumer.last_message_id())
    if end.empty:
        return
    while True:
        # The consumer's receive blocks: a thread of its own, as the worker's.
        batch: list[RawMessage] = await anyio.to_thread.run_sync(consumer.receive, 100, _QUIET_MS)
        if not batch:
            return
        for raw in batch:
            if end.past(raw):
                return  # dead-lettered after we began (a replayed one failing again, say)
            reached = end.reached(raw)
            yield raw
            if reached:
                return


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
    #: Found on the retry topic already (stored by a replay whose acknowledgement was lost): acknowledged, not sent.
    already: int = 0
    #: Messages on the retry topic naming a dead letter they are not a copy of: ignored (`ReplayMarks`).
    untrusted: int = 0
    #: Dead letters another client wrote (Java's DeadLetterPolicy): left where they are, unacknowledged.
    foreign: int = 0


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

    Each is acknowledged on the `eventbus-replay` subscription only once it is stored on the retry
    topic: found there (a replay before stored it) or its resend confirmed with a place (`_Resend`).
    A replay stopped half way and run again resends the rest. A dry run sends and acknowledges nothing.
    """
    dead_letters, retries = topics(settings, topic, group)
    report = ReplayReport(dead_letters, retries)
    # One producer name per group, whatever the filter: deduplication then drops the resend of a dead
    # letter that any earlier replay of the group stored (a killed one's last sends).
    settings = settings.model_copy(update={"producer_name": f"eventbus-replay-{group}"})
    connection = await connect(settings)
    try:
        stored = await _stored(connection, dead_letters)
        if not any(not d.foreign for d in stored):
            report.foreign = len(stored)  # none of ours: left where they are, and no subscription of ours there
            return report
        async with _replay_subscription(connection, dead_letters) as consumer:
            producers = Producers(connection.client, settings, connection.bridge)
            try:
                # The producer first, even for a dry run: a retry topic that refuses it fails the replay at once.
                producer = await producers.get(retries)
                marks = await _replayed(connection, dead_letters, retries)
                resend = _Resend(producer, marks, settings.send_deadline_seconds)
                async with contextlib.aclosing(_waiting(consumer)) as waiting:
                    await _replay_each(waiting, consumer, resend, dry_run, report, error_type, limit, progress)
                report.untrusted = marks.untrusted
            finally:
                # A resend the broker never answered keeps its slot: closing would wait for it for good.
                with anyio.move_on_after(min(settings.send_deadline_seconds, _CLOSE_WAIT)):
                    await producers.close()
    finally:
        await connection.close()
    return report


async def _replay_each(
    waiting: AsyncIterator[RawMessage],
    consumer: Consumer,
    resend: _Resend,
    dry_run: bool,
    report: ReplayReport,
    error_type: str | None,
    limit: int | None,
    progress: Callable[[DeadLetter, str | None], None] | None,
) -> None:
    """Resend and acknowledge each waiting dead letter the filter takes (a dry run: neither)."""
    acks: collections.deque[RawMessage] = collections.deque()
    async for raw in waiting:
        dead = DeadLetter.of(raw)
        if dead.foreign:
            report.foreign += 1  # whose group and retry rules are another client's: never sent to ours
            continue
        if resend.stored_already(dead) is not None:
            report.already += 1  # a replay before stored it; its acknowledgement did not reach the broker
            if not dry_run:
                acks.append(raw)
                consumer.acknowledge(acks)
            continue
        if error_type is not None and dead.error_type != error_type:
            report.skipped += 1
            continue
        if limit is not None and len(report.replayed) >= limit:
            return
        new_id = None
        if not dry_run:
            try:
                new_id = await resend(raw, dead)
            except EventBusError as exc:
                report.failed.append((dead, str(exc)))  # not acknowledged: the next replay tries it again
                if isinstance(exc, SendDeadline):
                    return  # the producer is stuck on it: the rest waits for the next replay
                continue
            acks.append(raw)
            consumer.acknowledge(acks)
        report.replayed.append((dead, new_id))
        if progress is not None:
            progress(dead, new_id)


class SendDeadline(EventBusError):
    """The broker did not confirm a resend within `send_deadline_seconds`."""


class _Resend:
    """Resends dead letters to the retry topic, and says where each is stored, or raises.

    What replays stored is read from the retry topic first (`stored_already`): a killed replay's last
    sends, and batches whose partial acknowledgement never reached the broker, are acknowledged, not
    sent again. The sequence id is the dead letter's position, so the broker also drops the resend of
    one stored but no longer on the retry topic. A filtered replay skips dead letters and sends later
    ones, so a position at or below the highest sequence id stored under the group's producer name is
    sent under the next id above it instead. A receipt that names no place is never taken for stored.
    """

    def __init__(self, producer: TopicProducer, marks: ReplayMarks, deadline: float) -> None:
        self._producer = producer
        self._marks = marks
        self._deadline = deadline
        self._highest = producer.last_sequence_id()

    def stored_already(self, dead: DeadLetter) -> str | None:
        """Its id on the retry topic, if a replay stored it there before."""
        return self._marks.copy_of(dead)

    async def __call__(self, raw: RawMessage, dead: DeadLetter) -> str:
        sequence = sequence_id(raw.message_id())
        if sequence is not None and sequence <= self._highest:
            sequence = self._highest + 1
        # A request's reply address goes: its requester heard of the failure when it was dead-lettered, and a
        # reply now would only bring a gone requester's reply topic back.
        kept = {k: v for k, v in dead.properties.items() if k not in (REPLY_TO, CORRELATION_ID)}
        properties = {**kept, REPLAYED_FROM: f"{self._marks.dead_letters}@{dead.message_id}"}
        message, size = build_message(
            dead.data, None, key=dead.key, properties=properties, event_time=raw.event_timestamp() or None,
            sequence_id=sequence,
        )
        try:
            with anyio.fail_after(self._deadline):
                sent = await self._producer.send(message, dead.key, size)
        except TimeoutError:
            raise SendDeadline(
                f"the broker did not confirm the resend of {dead.message_id} to {self._producer.topic} within "
                f"{self._deadline:g} s (EVENTBUS_SEND_DEADLINE_SECONDS): is it larger than the topic's "
                "maxMessageSize? Left in the dead-letter topic"
            ) from None
        if not stored(sent):
            raise EventBusError(
                f"the broker dropped the resend of {dead.message_id} as a duplicate, and it is not on "
                f"{self._producer.topic}: left in the dead-letter topic for the next replay"
            )
        if sequence is not None:
            self._highest = max(self._highest, sequence)
        return id_text(sent)
