"""Nothing a handler raises, nor a key, property or error text, stalls a subscription or loses a message."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import anyio
import pulsar
import pytest

from eventbus import EventBus, Message, Router, Settings, SubscriptionFailed

from .conftest import eventually, read_messages, running


def _client(bus: EventBus) -> pulsar.Client:
    token = bus.settings.jwt()
    auth = {"authentication": pulsar.AuthenticationToken(token)} if token else {}
    return pulsar.Client(bus.url, logger=pulsar.FileLogger(pulsar.LoggerLevel.Error, "/dev/null"), **auth)


async def _send_raw(bus: EventBus, topic: str, messages: list[tuple[bytes, str | bytes, dict[Any, Any]]]) -> None:
    """Publish in order as a Go or C++ producer could: keys and properties as any bytes.

    A key that is not UTF-8 goes through the bus (it takes bytes keys); a property
    that is not goes through the raw client, which passes bytes on as they are.
    """
    client = _client(bus)
    try:
        producer = await anyio.to_thread.run_sync(
            lambda: client.create_producer(bus.settings.topic(topic), batching_enabled=False)
        )
        for data, key, properties in messages:
            if isinstance(key, bytes):
                await bus.publish(topic, data, key=key, properties=properties)
            else:
                await anyio.to_thread.run_sync(lambda: producer.send(data, properties=properties, partition_key=key))
    finally:
        await anyio.to_thread.run_sync(client.close)


def _key_of(message: Any) -> str | bytes:
    try:
        return str(message.partition_key())
    except UnicodeDecodeError as exc:  # the client decodes the key; the error holds its bytes
        return bytes(exc.object)


def _dead_letters(bus: EventBus, topic: str, group: str) -> list[tuple[str | bytes, dict[str, str], bytes]]:
    """What the dead-letter topic holds, read back with the raw client: (key, properties, payload)."""
    client = _client(bus)
    try:
        messages = read_messages(client, bus.settings.topic(topic) + f"-{group}-DLQ")
    finally:
        client.close()
    return [(_key_of(m), m.properties(), m.data()) for m in messages]


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class _NotAnException(BaseException):
    pass


async def _raise_cancelled() -> None:
    inner = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    inner.cancel()
    await inner  # CancelledError, though nobody cancelled the handler


def _raise(exc: BaseException) -> Any:
    async def handler() -> None:
        raise exc

    return handler


RAISERS = {
    "CancelledError": _raise_cancelled,
    "GeneratorExit": _raise(GeneratorExit()),
    "SystemExit": _raise(SystemExit(3)),
    "KeyboardInterrupt": _raise(KeyboardInterrupt()),
    "BaseException": _raise(_NotAnException("odd")),
    "str-raises": _raise(_StrRaises()),
    "surrogate-text": _raise(FileNotFoundError("cannot open " + os.fsdecode(b"report-\xff.csv"))),
}


@pytest.mark.parametrize("kind", [*RAISERS, "sync-SystemExit"])
async def test_whatever_a_handler_raises_fails_only_its_message(settings: Settings, topic: str, kind: str) -> None:
    router = Router()
    handled: list[int] = []

    @router.subscribe(topic, "g", concurrency=2, max_retries=1, retry_backoff=0.01, initial_position="earliest")
    async def handle(n: int) -> None:
        if n == 3:
            if kind == "sync-SystemExit":
                await anyio.to_thread.run_sync(lambda: (_ for _ in ()).throw(SystemExit(1)))
            await RAISERS.get(kind, _raise(SystemExit(1)))()
        handled.append(n)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        for n in range(20):
            await bus.publish(topic, n, key=f"k{n % 4}")
        await eventually(lambda: len(handled) == 19, what="every other message, on every key")
        dead = await eventually_dead_letters(bus, topic, "g", 1)
        runner = bus.running[0]
        assert runner.failure is None
        await eventually(lambda: runner.in_flight == 0, what="the in-flight count back to zero")
    assert sorted(handled) == [n for n in range(20) if n != 3]
    [(key, properties, data)] = dead
    assert (key, data) == ("k3", b"3")
    assert properties["eventbus-dlq-reason"] == "handler-failed" and properties["eventbus-attempts"] == "2"
    if kind == "surrogate-text":
        assert properties["eventbus-error"] == "cannot open report-\\udcff.csv"
    if kind == "str-raises":
        assert properties["eventbus-error-type"] == "_StrRaises"


async def eventually_dead_letters(bus: EventBus, topic: str, group: str, count: int) -> list[Any]:
    found: list[Any] = []

    async def enough() -> bool:
        found[:] = await anyio.to_thread.run_sync(_dead_letters, bus, topic, group)
        return len(found) >= count

    with anyio.fail_after(30):
        while not await enough():
            await anyio.sleep(0.2)
    return found


async def test_keys_and_properties_that_are_not_utf8_neither_drop_nor_stall_anything(
    settings: Settings, topic: str
) -> None:
    # The first message of the backlog has a key that is not UTF-8: it once took the
    # rest of its receive batch with it and leaked the in-flight count (bound 100: nothing handled).
    settings = settings.model_copy(update={"consumer_max_in_flight": 100})
    router = Router()
    handled: dict[int, Message] = {}

    @router.subscribe(topic, "g", concurrency=4, initial_position="earliest")
    async def handle(p: dict, msg: Message) -> None:
        handled[p["n"]] = msg

    messages: list[tuple[bytes, str | bytes, dict[Any, Any]]] = [
        (b'{"n": %d}' % n, b"\xff\xfe" if n in (0, 5) else f"k{n % 8}", {}) for n in range(300)
    ]
    messages[7] = (b'{"n": 7}', "k7", {b"origin\xff": b"\xfe"})  # a property the client cannot hand over
    async with EventBus(settings, routers=[router]) as bus:
        await _send_raw(bus, topic, messages)
        async with running(bus):
            await eventually(lambda: len(handled) == 299, what="every message but the unreadable one")
            dead = await eventually_dead_letters(bus, topic, "g", 1)
            runner = bus.running[0]
            await eventually(lambda: runner.in_flight == 0, what="the in-flight count back to zero")
    assert handled[0].key == handled[5].key == "\\xff\\xfe"
    [(key, properties, data)] = dead
    assert (key, data) == ("k7", b'{"n": 7}')
    assert properties["eventbus-dlq-reason"] == "unreadable" and "not UTF-8" in properties["eventbus-error"]
    assert "eventbus-properties-lost" in properties


async def test_a_dead_letter_keeps_a_key_that_is_not_utf8(settings: Settings, topic: str) -> None:
    router = Router()

    @router.subscribe(topic, "g", max_retries=0, initial_position="earliest")
    async def handle(data: bytes) -> None:
        raise ValueError("no")

    async with EventBus(settings, routers=[router]) as bus:
        await _send_raw(bus, topic, [(b"x", b"\xff", {"a": "b"})])
        async with running(bus):
            [(key, properties, data)] = await eventually_dead_letters(bus, topic, "g", 1)
    assert (key, data, properties["a"]) == (b"\xff", b"x", "b")


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_hung_handler_times_out_and_its_key_goes_on(settings: Settings, topic: str, sync: bool) -> None:
    router = Router()
    handled: list[int] = []
    release = threading.Event()

    async def hang_async(n: int) -> None:
        if n == 0:
            await anyio.sleep_forever()
        handled.append(n)

    def hang_sync(n: int) -> None:
        if n == 0:
            release.wait(30)  # a thread cannot be cancelled: abandoned, released at the end
            return
        handled.append(n)

    handler = hang_sync if sync else hang_async
    router.subscribe(topic, "g", timeout=0.5, max_retries=1, retry_backoff=0.01, initial_position="earliest")(handler)
    try:
        async with EventBus(settings, routers=[router]) as bus, running(bus):
            started = time.monotonic()
            for n in range(10):
                await bus.publish(topic, n, key="same")
            await eventually(lambda: len(handled) == 9, what="the hung message's key to go on")
            [(_, properties, _)] = await eventually_dead_letters(bus, topic, "g", 1)
            assert time.monotonic() - started >= 1.0, "two attempts of 0.5 s each"
    finally:
        release.set()
    assert handled == list(range(1, 10))
    assert properties["eventbus-error-type"] == "HandlerTimeout" and "0.5s" in properties["eventbus-error"]


async def test_a_subscription_that_dies_stops_run_with_an_error(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventbus.consuming import runner as consumer

    router = Router()
    handled: list[int] = []
    router.subscribe(topic, "g", initial_position="earliest")(handled.append)
    real = consumer.key_of

    def broken(message: Any) -> Any:
        if message.data() == b"2":
            raise RuntimeError("a bug in the bus")
        return real(message)

    monkeypatch.setattr(consumer, "key_of", broken)
    async with EventBus(settings, routers=[router]) as bus:
        for n in range(3):
            await bus.publish(topic, n)
        with anyio.fail_after(30), pytest.raises(SubscriptionFailed, match="a bug in the bus"):
            await bus.run(handle_signals=False)
