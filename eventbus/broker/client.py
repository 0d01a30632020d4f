"""The one adapter to pulsar-client: its client, producers, consumers, messages and errors in our terms."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, cast

import _pulsar
import pulsar
import pulsar.asyncio

from ..codec import CONTENT_TYPE
from ..schemas import PayloadSchema
from ..errors import EventBusError, broker_error
from .wire import fields, first_chunk

log = logging.getLogger("eventbus")


class MessageId(Protocol):
    """The id the broker gave a message: ``str(id)`` is ``ledger:entry:partition:batch``, ``serialize()`` stable bytes."""

    def ledger_id(self) -> int: ...
    def entry_id(self) -> int: ...
    def partition(self) -> int: ...
    def batch_index(self) -> int: ...
    def serialize(self) -> bytes: ...


class RawMessage(Protocol):
    """A message as the client hands it over (or as `build_message` made it to send)."""

    def data(self) -> bytes: ...
    def length(self) -> int: ...  # the payload's size, without copying it
    def properties(self) -> dict[str, str]:
        """Raises UnicodeDecodeError when a property is not UTF-8: read it through `properties_of`."""
    def partition_key(self) -> str:
        """Raises UnicodeDecodeError when the key is not UTF-8: read it through `key_of`."""
    def message_id(self) -> MessageId: ...
    def redelivery_count(self) -> int: ...
    def topic_name(self) -> str: ...
    def publish_timestamp(self) -> int: ...
    def event_timestamp(self) -> int: ...
    def int_schema_version(self) -> int: ...  # -1: sent without a schema


class Result(Protocol):
    """The client's outcome of a send (`OK` or a failure named by `name`)."""

    @property
    def name(self) -> str: ...


#: A message's place in its topic: (partition, ledger, entry, batch index).
Ident = tuple[int, int, int, int]
#: A message's id as bytes (`id_key`).
IdKey = bytes
#: The ledger (1), entry (2) and optional partition (3) varint fields at the start of a serialized id.
_ENTRY = re.compile(rb"\x08[\x80-\xff]*[\x00-\x7f]\x10[\x80-\xff]*[\x00-\x7f](?:\x18[\x80-\xff]*[\x00-\x7f])?")
OK: Result = _pulsar.Result.Ok
CLIENT_ERRORS: tuple[type[Exception], ...] = (_pulsar.PulsarException, pulsar.asyncio.PulsarException)

#: Bytes a batch spends per message and per property besides their contents (an upper bound).
FRAMING = 32
_COMPRESSION = {
    "none": pulsar.CompressionType.NONE,
    "lz4": pulsar.CompressionType.LZ4,
    "zlib": pulsar.CompressionType.ZLib,
    "zstd": pulsar.CompressionType.ZSTD,
    "snappy": pulsar.CompressionType.SNAPPY,
}
_TYPES = {
    "key_shared": pulsar.ConsumerType.KeyShared,
    "shared": pulsar.ConsumerType.Shared,
    "failover": pulsar.ConsumerType.Failover,
    "exclusive": pulsar.ConsumerType.Exclusive,
}
_POSITIONS = {"latest": pulsar.InitialPosition.Latest, "earliest": pulsar.InitialPosition.Earliest}


def result_of(exc: BaseException) -> str:
    """The client's result name for one of its exceptions ("Timeout", "ConsumerBusy", ...)."""
    if isinstance(exc, pulsar.asyncio.PulsarException):
        return str(exc.error().name)
    if isinstance(exc, _pulsar.PulsarException) and type(exc) is not _pulsar.PulsarException:
        return type(exc).__name__
    return "UnknownError"


def error_for(what: str, exc: BaseException, topic: str | None = None) -> EventBusError:
    """The project's error for a client failure while doing `what` (on `topic`)."""
    detail = re.sub(r"^-?\d+ ", "", str(exc))  # pulsar.asyncio prefixes the result's number
    return broker_error(what, result_of(exc), detail, topic)


@contextmanager
def map_client_errors(what: str, topic: str | None = None) -> Iterator[None]:
    """Raise the client's failures inside as the project's error for doing `what`, the client's one as its cause."""
    try:
        yield
    except CLIENT_ERRORS as exc:
        raise error_for(what, exc, topic) from exc


# -- messages ---------------------------------------------------------------------


def build_message(
    data: bytes,
    content_type: str | None,
    *,
    key: str | bytes | None = None,
    properties: Mapping[str, str] | None = None,
    deliver_after: timedelta | float | None = None,
    event_time: datetime | int | None = None,
    sequence_id: int | None = None,
) -> tuple[RawMessage, int]:
    """Build a client message, checking every argument before anything is sent.

    Returns the message and about how many bytes it takes in a batch: payload,
    key, properties and their framing, which is what the broker's size limit counts.
    """
    builder = _pulsar.MessageBuilder()
    builder.content(data)
    size = len(data) + FRAMING
    if content_type is not None:
        builder.property(CONTENT_TYPE, content_type)
        size += len(CONTENT_TYPE) + len(content_type)
    if properties:
        for name, value in properties.items():
            if not isinstance(name, str) or not isinstance(value, str):
                bad = value if isinstance(name, str) else name
                raise TypeError(
                    f"message property {name!r}={value!r}: names and values must be str, and {bad!r} is of type "
                    f"{type(bad).__name__}; convert it with str()"
                )
            try:
                builder.property(name, value)
            except TypeError:  # pybind11's words for a str that is not valid UTF-8
                raise TypeError(
                    f"message property {name!r}={value!r} is not valid UTF-8 (a lone surrogate?): "
                    "encode it, e.g. value.encode('utf-8', 'backslashreplace').decode()"
                ) from None
            size += len(name) + len(value) + FRAMING
    if key is not None:
        if not isinstance(key, (str, bytes)):
            raise TypeError(f"message key must be str or bytes, not {type(key).__name__}")
        try:
            builder.partition_key(key)
        except TypeError:
            raise TypeError(f"message key {key!r} is not valid UTF-8 (a lone surrogate?): encode it first") from None
        size += len(key)
    if deliver_after is not None:
        if not isinstance(deliver_after, timedelta):
            deliver_after = timedelta(seconds=deliver_after)
        builder.deliver_after(deliver_after)
    if event_time is not None:
        if isinstance(event_time, datetime):
            event_time = int(event_time.timestamp() * 1000)
        builder.event_timestamp(event_time)
    if sequence_id is not None:
        builder.sequence_id(sequence_id)
    return cast(RawMessage, builder.build()), size


def properties_of(message: RawMessage) -> dict[str, str] | None:
    """The message's properties, or None when one is not UTF-8 (the client cannot hand them over then)."""
    try:
        return dict(message.properties())
    except UnicodeDecodeError:
        return None


def ident_of(message: RawMessage) -> Ident:
    mid = message.message_id()
    return (mid.partition(), mid.ledger_id(), mid.entry_id(), mid.batch_index())


def key_of(message: RawMessage) -> str | bytes:
    """The message's partition key: a str, or its bytes when they are not UTF-8 ("" for none)."""
    try:
        key: str = message.partition_key()
        return key
    except UnicodeDecodeError as exc:  # the client decodes the whole key; the error holds its bytes
        return bytes(exc.object)


def id_text(message_id: MessageId) -> str:
    """``ledger:entry:partition:batch``, as Pulsar's own tools print an id; a chunked message's names its first
    chunk and its last, ``first;last``, as the Java client does (the parts the client gives are the last's)."""
    last = f"{message_id.ledger_id()}:{message_id.entry_id()}:{message_id.partition()}:{message_id.batch_index()}"
    first = first_chunk(message_id.serialize())
    return last if first is None else "{}:{}:{}:{};".format(*first) + last


# str() of an id is what Pulsar's own tools, our logs and the CLI print; pybind11's was a tuple, "(3,-1,0,0)".
_pulsar.MessageId.__str__ = id_text


def new_message_id(ledger: int, entry: int, partition: int = -1, batch_index: int = -1) -> MessageId:
    """An id with these parts (for a message that no broker stored: the test kit's)."""
    return cast(MessageId, _pulsar.MessageId(partition, ledger, entry, batch_index))


def batch_size(message_id: MessageId) -> int:
    """How many messages the entry of a received message holds (1: not batched).

    The client keeps it in the id (protobuf `MessageIdData.batch_size`, field 6), which only
    `serialize()` shows. A reader needs it to know it has a whole entry: the client unpacks a
    batch into its receiver queue one message at a time, so an empty queue can still be short
    of the rest of the batch (a read-back that stopped there lost the end of the last batch).
    """
    size = fields(message_id.serialize()).get(6, 0)  # MessageIdData.batch_size
    return max(1, size) if isinstance(size, int) else 1


def id_key(message: RawMessage) -> IdKey:
    """The message's id as bytes (`MessageId.serialize()`): equal for every copy of one message, and
    cheaper than reading its parts (1.8 us against 2.8 us here, per message)."""
    return message.message_id().serialize()


def entry_of(key: IdKey) -> bytes:
    """What names the entry (and so the batch) of an `id_key`: its ledger, entry and partition fields.

    `MessageIdData` is written field by field in order (1 ledger, 2 entry, 3 partition when not -1,
    then 4 batch index, 6 batch size): the leading bytes up to the batch index are the entry. A
    match costs 0.3 us against 2.4 us for parsing the fields; a stop reads every remembered id.
    """
    found = _ENTRY.match(key)
    return found.group() if found is not None else key


class LastEntry:
    """Tells a reader when it has every message of a topic's last entry, as it stood when asked."""

    def __init__(self, last: MessageId) -> None:
        self.end = (int(last.ledger_id()), int(last.entry_id()))
        self._seen: set[int] = set()
        self._size = 0

    @property
    def empty(self) -> bool:
        """The topic held nothing."""
        return min(self.end) < 0

    def past(self, message: RawMessage) -> bool:
        """Stored after the last entry (a reader that began before it came)."""
        return ident_of(message)[1:3] > self.end

    def reached(self, message: RawMessage) -> bool:
        """Count `message`; True once every message of the last entry has been counted."""
        ident = ident_of(message)
        if ident[1:3] == self.end:
            self._seen.add(ident[3])
            self._size = batch_size(message.message_id())
        return bool(self._seen) and len(self._seen) >= self._size


def stored(message_id: MessageId) -> bool:
    """Whether a receipt's id names a place in the topic.

    Apache Pulsar with deduplication confirms a message it dropped as a duplicate with
    ``-1:-1:-1:0``: no place, and no proof the message is stored (a higher sequence id
    of the same producer name may have been all it saw).
    """
    return bool(message_id.ledger_id() >= 0 and message_id.entry_id() >= 0)


def sibling_ids(message_id: MessageId, count: int) -> list[MessageId]:
    """The ids of the first `count` messages of the batch whose receipt is `message_id`.

    The receipt's parts are read once per batch, not once per message: three calls into the client each
    (py-spy: the per-message form was 7.6 % of the publish path's own time).
    """
    partition, ledger, entry = message_id.partition(), message_id.ledger_id(), message_id.entry_id()
    make = _pulsar.MessageId
    return [cast(MessageId, make(partition, ledger, entry, index)) for index in range(count)]


# -- the client -------------------------------------------------------------------


def _client_logger(level: str) -> Any:
    """The C++ client's logger.

    Handed a Python logger, the client calls into Python for every debug line,
    five per message, each taking the GIL from its I/O thread: that alone cost
    more than half of the publish path. So only at DEBUG do its logs go through
    Python logging ("eventbus.pulsar"); otherwise its warnings and errors go
    straight to stderr, filtered in C++.
    """
    if level == "DEBUG":
        return logging.getLogger("eventbus.pulsar")
    if level == "CRITICAL":
        return pulsar.FileLogger(pulsar.LoggerLevel.Error, "/dev/null")
    native = pulsar.LoggerLevel.Error if level == "ERROR" else pulsar.LoggerLevel.Warn
    return pulsar.FileLogger(native, "/dev/stderr")


def _ignore(result: Result, *_: object) -> None:
    # A callback that raises inside the client aborts the process; the outcome
    # of an acknowledgement or a flush needs nobody: a lost ack is a redelivery.
    pass


class Client:
    """A connected client; every call raises the project's errors, never the client's."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        operation_timeout_seconds: int,
        connection_timeout_ms: int,
        log_level: str,
        tls_trust_certs_file: Path | None,
        tls_validate_hostname: bool,
    ) -> None:
        options: dict[str, Any] = dict(
            operation_timeout_seconds=operation_timeout_seconds,
            connection_timeout_ms=connection_timeout_ms,
            logger=_client_logger(log_level),
        )
        if token:
            options["authentication"] = pulsar.AuthenticationToken(token)
        if tls_trust_certs_file is not None:
            options["tls_trust_certs_file_path"] = str(tls_trust_certs_file)
        if url.startswith("pulsar+ssl://"):
            options["tls_validate_hostname"] = tls_validate_hostname
        self._client: pulsar.asyncio.Client | None = pulsar.asyncio.Client(url, **options)

    def _open(self) -> pulsar.asyncio.Client:
        if self._client is None:
            raise EventBusError("the client is closed")
        return self._client

    async def schema(self, topic: str, version: int = -1) -> PayloadSchema | None:
        """The topic's registered schema at `version` (-1: the latest), or None when it has none."""
        raw: _pulsar.Client = self._open()._client
        try:
            # The client's call blocks until the broker answers: on a thread of its own.
            with map_client_errors(f"cannot read the schema of {topic}", topic):
                info = await asyncio.to_thread(raw.get_schema_info, topic, version)
        except EventBusError as exc:
            if exc.result == "TopicNotFound":  # what the broker answers for a topic without a schema
                return None
            raise
        kind = str(info.schema_type()).rsplit(".", 1)[-1]
        return None if kind in ("NONE", "BYTES") else PayloadSchema(kind, info.name(), info.schema())

    async def partitions(self, topic: str) -> list[str]:
        """The topic's partitions; a partitioned topic of one names it "...-partition-0"."""
        with map_client_errors(f"cannot look up {topic}", topic):
            return list(await self._open().get_topic_partitions(topic))

    async def create_producer(
        self,
        topic: str,
        *,
        batching: bool,
        batching_max_messages: int,
        batching_max_bytes: int,
        batching_max_delay_ms: int,
        compression: str,
        send_timeout_ms: int,
        max_pending_messages: int,
        producer_name: str | None,
        schema: PayloadSchema | None = None,
    ) -> Producer:
        """A producer; with `schema`, registered on the topic (the bus encodes payloads itself, as JSON)."""
        options: dict[str, Any] = dict(
            batching_enabled=batching,
            # Key-based batches keep one key per batch, which key_shared consumers need.
            batching_type=pulsar.BatchingType.KeyBased,
            batching_max_messages=batching_max_messages,
            batching_max_allowed_size_in_bytes=batching_max_bytes,
            batching_max_publish_delay_ms=batching_max_delay_ms,
            compression_type=_COMPRESSION[compression],
            send_timeout_millis=send_timeout_ms,
            max_pending_messages=max_pending_messages,
            block_if_queue_full=False,
        )
        if producer_name:
            options["producer_name"] = producer_name
        if schema is not None:
            options["schema"] = _Registered(schema)
        with map_client_errors(f"cannot create a producer for {topic}", topic):
            return Producer(await self._open().create_producer(topic, **options))

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        subscription_type: str,
        initial_position: str,
        receiver_queue_size: int,
        consumer_name: str,
        batch_index_ack: bool,
        sticky: tuple[int, int] | None = None,
    ) -> Consumer:
        """`sticky`: a key_shared consumer of only the keys whose hash (0-65535) is in that range, both ends
        included; the broker refuses it (ConsumerAssignError) while another consumer of the group holds any of it."""
        options: dict[str, Any] = {}
        if sticky is not None:
            options["key_shared_policy"] = pulsar.ConsumerKeySharedPolicy(pulsar.KeySharedMode.Sticky, False, [sticky])
        with map_client_errors(f"cannot subscribe {group!r} to {topic}", topic):
            wrapper = await self._open().subscribe(
                topic,
                group,
                consumer_type=_TYPES[subscription_type],
                initial_position=_POSITIONS[initial_position],
                receiver_queue_size=receiver_queue_size,
                consumer_name=consumer_name,
                batch_index_ack_enabled=batch_index_ack,
                **options,
            )
        return Consumer(wrapper)

    async def reader(self, topic: str) -> Reader:
        """A Reader of `topic` from its first message: a non-durable subscription, gone with its connection."""
        with map_client_errors(f"cannot read {topic}", topic):
            return Reader(await self._open().create_reader(topic, pulsar.MessageId.earliest))

    async def read(self, topic: str, limit: int | None, *, by_subscription: bool) -> list[RawMessage]:
        """The messages stored on `topic` (the first `limit`), oldest first; no existing subscription moves.

        With a Reader, or `by_subscription`: a temporary shared subscription, removed afterwards.
        """
        if by_subscription:
            return await self._read_by_subscription(topic, limit)
        with map_client_errors(f"cannot read {topic}", topic):
            reader = Reader(await self._open().create_reader(topic, pulsar.MessageId.earliest))
        found: list[RawMessage] = []
        try:
            while limit is None or len(found) < limit:
                raw = await reader.next(5_000)
                if raw is None:
                    break
                found.append(raw)
        finally:
            await reader.close()
        return found

    async def _read_by_subscription(self, topic: str, limit: int | None) -> list[RawMessage]:
        name = f"eventbus-read-{uuid.uuid4().hex[:12]}"
        consumer = await self.subscribe(
            topic, name, subscription_type="shared", initial_position="earliest", receiver_queue_size=1000,
            consumer_name=name, batch_index_ack=False,
        )
        try:
            try:
                last = await consumer.last_message_id()
            except EventBusError as exc:
                if exc.result == "UnknownError":  # a topic with nothing stored answers so
                    return []
                raise
            end = LastEntry(last)
            found: list[RawMessage] = []
            done = end.empty
            while not done and (limit is None or len(found) < limit):
                # The consumer's receive blocks: a thread, never the event loop.
                batch = await asyncio.to_thread(consumer.receive, 1_000, 5_000)
                if not batch:
                    raise EventBusError(f"cannot read {topic}: nothing came for 5 s before its last message")
                found += batch
                done = any([end.reached(m) for m in batch])  # every one counted: a list, not a generator
            return found[:limit]
        finally:
            await consumer.unsubscribe()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class Reader:
    """Reads a topic from the start, without a durable subscription (`Client.read`, `Client.reader`)."""

    def __init__(self, wrapper: pulsar.asyncio.Reader) -> None:
        self._wrapper = wrapper

    async def next(self, timeout_ms: int) -> RawMessage | None:
        """The next message, or None when none is stored after the last one read."""
        try:
            if not await self._wrapper.has_message_available():
                return None
        except CLIENT_ERRORS as exc:
            # A topic with nothing stored yet answers UnknownError (Apache Pulsar 3.0: "Topic has
            # no messages"; pulsar-lite); anything else (a lost connection) is not "empty".
            if result_of(exc) == "UnknownError":
                return None
            raise error_for("cannot read", exc) from exc
        try:
            with map_client_errors("cannot read"):
                message = await asyncio.wait_for(self._wrapper.read_next(), timeout_ms / 1000)
        except asyncio.TimeoutError:
            return None
        return cast(RawMessage, message._message)

    async def receive(self) -> RawMessage:
        """The next message, however long it takes (a client callback, no thread); ConsumerClosed once closed."""
        try:
            message = await self._wrapper.read_next()
        except CLIENT_ERRORS as exc:
            if result_of(exc) == "AlreadyClosed":
                raise ConsumerClosed from None
            raise error_for("cannot read", exc) from exc
        return cast(RawMessage, message._message)

    async def close(self) -> None:
        try:
            await self._wrapper.close()
        except CLIENT_ERRORS:
            pass


class _Registered(pulsar.schema.Schema):  # type: ignore[misc]
    """A schema the client registers for a producer; payloads are sent as the bus encoded them (raw sends)."""

    def __init__(self, schema: PayloadSchema) -> None:  # not super's: its definition is a dict, ours JSON text
        self._record_cls = bytes
        self._schema_info = _pulsar.SchemaInfo(_SCHEMA_TYPES[schema.kind], schema.name, schema.definition)

    def encode(self, obj: bytes) -> bytes:
        return obj

    def decode(self, data: bytes) -> bytes:
        return data


_SCHEMA_TYPES = {"JSON": _pulsar.SchemaType.JSON}


class Producer:
    """A topic's producer: sends with a callback per receipt (`send`), never waiting."""

    def __init__(self, wrapper: pulsar.asyncio.Producer) -> None:
        self._wrapper = wrapper
        raw: _pulsar.Producer = wrapper._producer
        #: ``send(message, callback or None)``; the callback gets (result, message id) on a client thread.
        self.send: Callable[[RawMessage, Callable[[Result, MessageId], None] | None], None] = raw.send_async
        self._flush_async = raw.flush_async
        self._raw = raw

    def last_sequence_id(self) -> int:
        """The highest sequence id the broker stored for this producer's name (-1: none, or no deduplication)."""
        return int(self._raw.last_sequence_id())

    def send_unconfirmed(self, data: bytes) -> None:
        """Send `data` and never learn whether it was stored (a heartbeat: the next one says it again)."""
        self.send(build_message(data, None)[0], _ignore)

    def flush_soon(self) -> None:
        """Ask the client to send what it holds in its batch container now."""
        self._flush_async(_ignore)

    async def flush(self) -> None:
        await self._wrapper.flush()

    async def close(self) -> None:
        await self._wrapper.close()


class ConsumerClosed(Exception):
    """The consumer was closed while receiving."""


def _arrived(loop: asyncio.AbstractEventLoop, future: asyncio.Future[RawMessage], result: Any, message: RawMessage) -> None:
    """The client's receive callback, on its thread: never raises (that would end the process)."""
    try:
        loop.call_soon_threadsafe(_settle, future, result, message)
    except BaseException:  # the loop is closed: nobody waits any more
        pass


def _retrieved(future: asyncio.Future[RawMessage]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[RawMessage], result: Any, message: RawMessage) -> None:
    if future.done():
        return  # cancelled: the message is left unacknowledged
    if result == _pulsar.Result.Ok:
        future.set_result(message)
    elif result == _pulsar.Result.AlreadyClosed:
        future.set_exception(ConsumerClosed())
    else:
        failure = broker_error("cannot receive", str(getattr(result, "name", result)), "", None)
        future.set_exception(failure)


class Consumer:
    """A subscription's consumer: `receive` with a timeout blocks (a thread of its own); `receive_later` waits in the
    client, on its callback."""

    def __init__(self, wrapper: pulsar.asyncio.Consumer) -> None:
        self._wrapper: pulsar.asyncio.Consumer | None = wrapper
        self._raw: _pulsar.Consumer = wrapper._consumer

    def receive(self, limit: int, timeout_ms: int) -> list[RawMessage]:
        """Wait up to `timeout_ms` for a message, then take up to `limit` that are already here ([] if none)."""
        return self.receive_sized(limit, timeout_ms)[0]

    def receive_sized(self, limit: int, timeout_ms: int, max_bytes: int = 1 << 62) -> tuple[list[RawMessage], int]:
        """`receive`, stopping at the first message that brings the payloads to `max_bytes` or more; with their size."""
        raw = self._raw
        try:
            first = raw.receive(timeout_ms)
        except _pulsar.Timeout:
            return [], 0
        except _pulsar.AlreadyClosed:
            raise ConsumerClosed from None
        batch, size = [first], first.length()
        while len(batch) < limit and size < max_bytes:
            try:
                message = raw.receive(0)
            except (_pulsar.Timeout, _pulsar.AlreadyClosed):
                break
            batch.append(message)
            size += message.length()
        return batch, size

    def receive_later(self) -> asyncio.Future[RawMessage]:
        """The next message, when the client's queue has one: its callback settles the future (no thread waits).

        A receive cannot be taken back: a message that comes after the future was cancelled stays unacknowledged,
        for the broker to send again once the consumer closes. Closed: `ConsumerClosed`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RawMessage] = loop.create_future()
        future.add_done_callback(_retrieved)  # a closed consumer's answer, nobody waiting: no "never retrieved"
        self._raw.receive_async(functools.partial(_arrived, loop, future))
        return future

    def acknowledge(self, messages: collections.deque[RawMessage]) -> None:
        """Acknowledge and empty `messages`, without waiting; an ack that does not reach the broker means a redelivery."""
        ack = self._raw.acknowledge_async
        while messages:
            ack(messages.popleft(), _ignore)

    @property
    def connected(self) -> bool:
        """Connected to its broker now (False while the client reconnects)."""
        return bool(self._raw.is_connected())

    async def last_message_id(self) -> MessageId:
        """The id of the topic's last stored message (ledger -1 or entry -1 when it holds none)."""
        assert self._wrapper is not None
        with map_client_errors("cannot ask for the last message id"):
            return cast(MessageId, await self._wrapper.get_last_message_id())

    async def unsubscribe(self) -> None:
        """Delete the subscription (a temporary one) and close the consumer."""
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is not None:
            try:
                await wrapper.unsubscribe()
            except CLIENT_ERRORS as exc:
                log.warning("removing subscription %s: %s", wrapper.subscription_name(), exc)
            await wrapper.close()

    def redeliver_unacknowledged(self) -> None:
        """Ask the broker to send again every message this consumer holds unacknowledged."""
        self._raw.redeliver_unacknowledged_messages()

    async def close(self) -> None:
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is not None:
            with map_client_errors("closing a consumer"):
                await wrapper.close()
