"""Effectively-once outputs: a handler's outputs stored once however often it runs, read back with the raw client."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from pydantic import SecretStr

from eventbus import Batch, EventBus, Reject, Router, Settings
from eventbus.broker.client import stored
from eventbus.consuming.presence import PRESENCE_TOPIC

from .conftest import eventually, raw_client, read_stored, running
from .pulsar_admin import admin
from .test_worker_process import cli



@pytest.fixture
def dedup(pulsar: dict) -> Settings:
    """Apache Pulsar's `public/dedup` (deduplication on), as a worker with a client token sees it."""
    return Settings(
        _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], namespace="dedup",
        admin_url=pulsar["admin_url"], admin_token=pulsar["admin_token"], shutdown_drain_timeout=10,
    )


def outputs(pulsar: dict, topic: str) -> collections.Counter[bytes]:
    """How many times the broker stored each payload of `public/dedup/<topic>`."""
    found = read_stored(pulsar["service_url"], pulsar["admin_token"], f"persistent://public/dedup/{topic}")
    return collections.Counter({payload: len(places) for payload, places in found.items()})


async def test_a_rerun_of_a_message_stores_each_of_its_outputs_once(pulsar: dict, dedup: Settings, topic: str) -> None:
    """Two publishes and a return value per message; the first attempt fails after storing them all."""
    out = f"{topic}-out"
    attempts: collections.Counter[int] = collections.Counter()
    rerun_ids: list[Any] = []
    router = Router()

    @router.subscribe(
        topic, "g", subscription_type="failover", effectively_once=True, returns_to=out, initial_position="earliest",
        retry_backoff=0,
    )
    async def handle(n: int, bus: EventBus) -> dict:
        attempts[n] += 1
        first = await bus.publish(out, {"n": n, "part": 1}, key=str(n))
        second = await bus.publish(out, {"n": n, "part": 2}, key=str(n))
        if attempts[n] == 1:
            raise RuntimeError("failed after storing its outputs")
        rerun_ids.extend([first, second])
        return {"n": n, "part": 3}

    async with EventBus(dedup, routers=[router]) as bus, running(bus):
        for n in range(5):
            await bus.publish(topic, n, key=str(n))
        await eventually(lambda: len(rerun_ids) == 10, what="every message handled on its second attempt")
    counts = outputs(pulsar, out)
    assert sum(counts.values()) == 15 and set(counts.values()) == {1}, counts
    assert not any(stored(i) for i in rerun_ids), "a rerun's copy the broker dropped comes back with no place"


async def test_messages_of_one_batch_each_keep_their_outputs(pulsar: dict, dedup: Settings, topic: str) -> None:
    """Messages of one batch share their ledger and entry: the batch index tells their outputs apart."""
    out = f"{topic}-out"
    handled: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", subscription_type="failover", effectively_once=True, returns_to=out,
                      initial_position="earliest")
    async def handle(n: int) -> int:
        handled.append(n)
        return n

    async with EventBus(dedup, routers=[router]) as bus, running(bus):
        ids = await bus.publish_batch(topic, range(20), key="one-key")
        assert len({(i.ledger_id(), i.entry_id()) for i in ids}) == 1, "the 20 went as one batch"
        await eventually(lambda: len(handled) == 20)
    assert outputs(pulsar, out) == collections.Counter({str(n).encode(): 1 for n in range(20)})


async def test_keys_handled_at_once_send_their_outputs_in_the_order_received(
    pulsar: dict, dedup: Settings, topic: str
) -> None:
    """Concurrency 8 over 64 keys, handlers taking random times: every output stored, once, each key's in order.

    An output sent after a later message's (a higher id under the same name) would be dropped by the broker: lost.
    """
    out = f"{topic}-out"
    rng = random.Random(7)
    delays = [rng.uniform(0, 0.01) for _ in range(640)]
    handled: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", subscription_type="failover", effectively_once=True, concurrency=8,
                      initial_position="earliest")
    async def handle(event: dict, bus: EventBus) -> None:
        await anyio.sleep(delays[event["seq"]])
        for part in range(2):
            await bus.publish(out, {**event, "part": part}, key=event["key"])
        handled.append(event["seq"])

    async with EventBus(dedup, routers=[router]) as bus, running(bus):
        for seq in range(640):
            await bus.publish(topic, {"key": f"k{seq % 64}", "seq": seq}, key=f"k{seq % 64}")
        await eventually(lambda: len(handled) == 640, timeout=60)
    counts = outputs(pulsar, out)
    assert len(counts) == 1280 and set(counts.values()) == {1}, f"{1280 - len(counts)} missing"


async def test_a_broker_that_does_not_deduplicate_is_said_at_start_and_outputs_go_at_least_once(
    settings: Settings, broker_kind: str, topic: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """The embedded broker, and Apache Pulsar's `public/default` (no deduplication policy): one WARNING naming why and
    the fix; the outputs go at least once, nothing dropped."""
    pulsar = request.getfixturevalue(broker_kind) if settings.url else None
    if pulsar is not None:
        admin = {"admin_url": pulsar["admin_url"], "admin_token": SecretStr(pulsar["admin_token"])}
        settings = settings.model_copy(update=admin)
    out = f"{topic}-out"
    attempts: collections.Counter[int] = collections.Counter()
    router = Router()

    @router.subscribe(topic, "g", subscription_type="failover", effectively_once=True, returns_to=out,
                      initial_position="earliest", retry_backoff=0)
    async def handle(n: int, bus: EventBus) -> None:
        attempts[n] += 1
        await bus.publish(out, n)
        if attempts[n] == 1:
            raise RuntimeError("again")

    with caplog.at_level(logging.WARNING, logger="eventbus"):
        async with EventBus(settings, routers=[router]) as bus, running(bus):
            await bus.publish(topic, 1)
            await eventually(lambda: attempts[1] == 2)
            url = bus.url
    said = [r.getMessage() for r in caplog.records if "effectively_once is off" in r.getMessage()]
    why = "public/default sets no deduplication policy" if pulsar else "the embedded broker (pulsar-lite) does not"
    assert len(said) == 1 and why in said[0] and "handle" in said[0], said
    assert pulsar is None or "EVENTBUS_DEDUPLICATION=true" in said[0]
    found = read_stored(url, settings.jwt(), settings.topic(out))
    assert len(found[b"1"]) == 2, "at least once: the rerun's output stored again, nothing dropped"


async def test_an_output_topic_whose_policy_turns_deduplication_off_is_said_and_its_outputs_go_at_least_once(
    pulsar: dict, dedup: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`public/dedup` deduplicates, but a topic policy turns it off on one output topic: one WARNING names that
    topic and the fix; its outputs go at least once (a rerun's stored again), the other topic's once."""
    on, off = f"{topic}-on", f"{topic}-off"
    policy = f"/admin/v2/persistent/public/dedup/{off}/deduplicationEnabled"
    admin(pulsar, "PUT", f"/admin/v2/persistent/public/dedup/{off}")
    admin(pulsar, "POST", policy, False)
    await eventually(lambda: admin(pulsar, "GET", f"{policy}?applied=true") is False, what="the topic policy applied")
    attempts: collections.Counter[int] = collections.Counter()
    router = Router()

    @router.subscribe(topic, "g", subscription_type="failover", effectively_once=True, initial_position="earliest",
                      retry_backoff=0)
    async def handle(n: int, bus: EventBus) -> None:
        attempts[n] += 1
        await bus.publish(on, n)
        await bus.publish(off, n)
        if attempts[n] == 1:
            raise RuntimeError("failed after storing its outputs")

    with caplog.at_level(logging.WARNING, logger="eventbus"):
        async with EventBus(dedup, routers=[router]) as bus, running(bus):
            for n in range(3):
                await bus.publish(topic, n, key=str(n))
            await eventually(lambda: all(attempts[n] == 2 for n in range(3)), what="every message rerun")
    said = [r.getMessage() for r in caplog.records if "does not deduplicate" in r.getMessage()]
    assert len(said) == 1 and f"persistent://public/dedup/{off} does not" in said[0], said
    assert outputs(pulsar, on) == collections.Counter({b"0": 1, b"1": 1, b"2": 1})
    assert outputs(pulsar, off) == collections.Counter({b"0": 2, b"1": 2, b"2": 2})


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"subscription_type": "shared"}, "effectively_once=True needs an ordered subscription (key_shared, failover"),
        ({"effectively_once": "yes"}, "effectively_once='yes' must be True or False"),
        ({"batch": Batch()}, "effectively_once=True is for handlers of one message"),
    ],
)
def test_effectively_once_where_it_cannot_hold_is_refused_at_registration(options: dict, words: str) -> None:
    router = Router()
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        router.subscribe("orders", "g", **{"effectively_once": True, **options})(lambda n: None)


def test_a_worker_killed_after_storing_its_outputs_stores_none_again_when_the_message_is_rerun(
    pulsar: dict, base_env: dict[str, str], topic: str, tmp_path: Path
) -> None:
    """SIGKILL between the outputs' receipts and the acknowledgement; the next worker reruns the message."""
    env = {
        **base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"],
        "EVENTBUS_NAMESPACE": "dedup", "EVENTBUS_ADMIN_URL": pulsar["admin_url"],
        "EVENTBUS_ADMIN_TOKEN": pulsar["admin_token"], "ONCE_TOPIC": topic, "ONCE_MARK": str(tmp_path / "killed"),
    }
    client = raw_client(pulsar["service_url"], pulsar["admin_token"])
    try:
        producer = client.create_producer(f"persistent://public/dedup/{topic}")
        for n in range(6):
            producer.send(str(n).encode())
    finally:
        client.close()
    first = subprocess.run([sys.executable, "-m", "eventbus", "run", "tests.apps.once_crash"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = subprocess.Popen([sys.executable, "-m", "eventbus", "run", "tests.apps.once_crash"], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(counts := outputs(pulsar, f"{topic}-out")) < 12 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=30)
    assert second.returncode == 0, err[-2000:]
    assert len(counts) == 12 and set(counts.values()) == {1}, counts


async def test_a_replayed_dead_letter_stores_its_outputs_beside_the_originals(
    pulsar: dict, dedup: Settings, base_env: dict[str, str], topic: str
) -> None:
    """The retry topic's messages have places of their own: a replay's outputs are new, not the originals' ids."""
    out = f"{topic}-out"
    refused: set[int] = set()
    handled: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", subscription_type="failover", effectively_once=True, returns_to=out,
                      initial_position="earliest")
    async def handle(n: int) -> int:
        if n == 5 and n not in refused:
            refused.add(n)
            raise Reject("not yet")
        handled.append(n)
        return n

    env = {**base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"],
           "EVENTBUS_NAMESPACE": "dedup", "EVENTBUS_ADMIN_URL": pulsar["admin_url"],
           "EVENTBUS_ADMIN_TOKEN": pulsar["admin_token"]}
    async with EventBus(dedup, routers=[router]) as bus, running(bus):
        for n in range(10):
            await bus.publish(topic, n, key=str(n))
        await eventually(lambda: len(handled) == 9)
        replay = await anyio.to_thread.run_sync(lambda: cli(env, "dlq", "replay", topic, "g"))
        assert replay.returncode == 0, replay.stderr
        await eventually(lambda: 5 in handled)
    assert outputs(pulsar, out) == collections.Counter({str(n).encode(): 1 for n in range(10)})


async def test_key_shared_members_share_the_key_slots_and_one_leaving_mid_flight_hands_its_share_over(
    pulsar: dict, dedup: Settings, topic: str
) -> None:
    """A group's first member holds all its slots; a second joins and each holds half; 64 keys, concurrency 8, the
    first stops after a third of the messages: every output stored once, each key's in the order of its messages."""
    out = f"{topic}-out"
    handled: collections.Counter[str] = collections.Counter()

    def member(name: str) -> Router:
        router = Router()

        @router.subscribe(topic, "g", effectively_once=True, concurrency=8, initial_position="earliest")
        async def handle(event: dict, bus: EventBus) -> None:
            await anyio.sleep(0.001 * (event["seq"] % 5))
            for part in range(2):
                await bus.publish(out, {**event, "part": part}, key=event["key"])
            handled[name] += 1

        return router

    def consuming(bus: EventBus) -> int:
        return sum(r.state == "consuming" for r in bus.running)

    async with EventBus(dedup, routers=[member("a")]) as a, EventBus(dedup, routers=[member("b")]) as b:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: a.run(handle_signals=False, task_status=task_status))
            await eventually(lambda: consuming(a) == 32, what="a alone holding every slot (16 of the topic, 16 of "
                             "its retry topic)")
            garble(pulsar)  # what no member said: ignored, and every member keeps listening
            async with running(b):
                await eventually(lambda: consuming(a) == consuming(b) == 16 and len(b.running) == 16, timeout=30,
                                 what="a and b holding half the slots each")
                for seq in range(640):
                    await a.publish(topic, {"key": f"k{seq % 64}", "seq": seq}, key=f"k{seq % 64}")
                await eventually(lambda: handled["a"] >= 200, timeout=60)
                assert handled["b"] > 0, "b took no messages while a ran"
                a.stop()
                await eventually(lambda: sum(handled.values()) >= 640, timeout=60, what="the rest, after a left")
                await eventually(lambda: consuming(b) == 32, timeout=30, what="b holding every slot once a left")
    assert sum(handled.values()) == 640, handled
    found = read_stored(pulsar["service_url"], pulsar["admin_token"], f"persistent://public/dedup/{out}")
    assert len(found) == 1280 and all(len(places) == 1 for places in found.values()), f"{1280 - len(found)} missing"
    by_key: dict[str, list[tuple[tuple[int, ...], int, int]]] = collections.defaultdict(list)
    for payload, places in found.items():
        event = orjson.loads(payload)
        by_key[event["key"]].append((places[0], event["seq"], event["part"]))
    for key, stored_ in by_key.items():
        assert [(seq, part) for _, seq, part in sorted(stored_)] == sorted((s, p) for _, s, p in stored_), key


async def test_a_members_key_slots_run_at_most_concurrency_handlers_between_them(
    pulsar: dict, dedup: Settings, topic: str
) -> None:
    """One member holding all 16 slots, concurrency 2, 64 keys: at most 2 handlers run their code at once (one
    waiting for its output's turn lends its place), and every message's output is stored once."""
    out = f"{topic}-out"
    now = peak = 0
    handled: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", effectively_once=True, concurrency=2, initial_position="earliest")
    async def handle(n: int, bus: EventBus) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await anyio.sleep(0.005)  # work, long enough for other slots' handlers to start beside it
        now -= 1
        await bus.publish(out, n, key=str(n % 64))
        handled.append(n)

    async with EventBus(dedup, routers=[router]) as bus:
        await asyncio.gather(*(bus.publish(topic, n, key=str(n % 64)) for n in range(256)))
        async with running(bus):
            await eventually(lambda: len(handled) == 256, timeout=60, what="every message handled")
    assert peak == 2
    assert outputs(pulsar, out) == collections.Counter({str(n).encode(): 1 for n in range(256)})


async def test_a_member_that_cannot_join_the_presence_topic_says_so_once_and_takes_the_slots_first_come(
    pulsar: dict, dedup: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A namespace that deduplicates but creates no topic by itself: the presence topic cannot be made. One WARNING
    names it and the fix; the worker holds every slot (first come) and stores each output once."""
    namespace = "/admin/v2/namespaces/public/closed"
    try:
        admin(pulsar, "PUT", namespace)
    except httpx.HTTPStatusError as exc:
        assert exc.response.status_code == 409  # made by an earlier test run on this broker
    admin(pulsar, "POST", f"{namespace}/deduplication", True)
    admin(pulsar, "POST", f"{namespace}/autoTopicCreation", {"allowAutoTopicCreation": False})
    for name in (topic, f"{topic}-out", f"{topic}-g-RETRY", f"{topic}-g-DLQ"):
        admin(pulsar, "PUT", f"/admin/v2/persistent/public/closed/{name}")
    closed = dedup.model_copy(update={"namespace": "closed"})
    router = Router()

    @router.subscribe(topic, "g", effectively_once=True, returns_to=f"{topic}-out", initial_position="earliest")
    async def handle(n: int) -> int:
        return n

    with caplog.at_level(logging.WARNING, logger="eventbus"):
        async with EventBus(closed, routers=[router]) as bus, running(bus):
            await eventually(lambda: sum(r.state == "consuming" for r in bus.running) == 32, what="every slot held")
            for n in range(5):
                await bus.publish(topic, n, key=str(n))
            found: dict = {}
            def stored_all() -> bool:
                found.update(read_stored(pulsar["service_url"], pulsar["admin_token"],
                                         f"persistent://public/closed/{topic}-out"))
                return len(found) == 5
            await eventually(stored_all, what="five outputs")
    said = [r.getMessage() for r in caplog.records if "cannot learn the other members" in r.getMessage()]
    assert len(said) == 1 and "eventbus-members" in said[0] and "allow this worker" in said[0], said
    assert all(len(places) == 1 for places in found.values())


def garble(pulsar: dict) -> None:
    """Send the presence topic what is not a heartbeat, from a client of the namespace (the app's own token)."""
    client = raw_client(pulsar["service_url"], pulsar["client_token"])
    try:
        producer = client.create_producer(f"non-persistent://public/dedup/{PRESENCE_TOPIC}")
        for junk in (b"\xff\xfe", b"[]", b'{"member": "x"}', b'{"member": "x", "groups": [["t"]]}',
                     b'{"member": "x", "groups": [["t", "g", ["one"]]]}', b'{"member": "x", "groups": 7}'):
            producer.send(junk)
    finally:
        client.close()


async def test_a_keys_next_message_waiting_behind_a_later_keys_one_that_waits_to_send_is_taken_first(
    pulsar: dict, dedup: Settings, topic: str
) -> None:
    """Concurrency 1: while a's first message runs, a's second and b's first arrive; a's second is ready only once
    the first finishes, after b's. b's output waits for a's second: taken first, it would wait for good."""
    out = f"{topic}-out"
    handled: list[str] = []
    router = Router()

    @router.subscribe(topic, "g", subscription_type="failover", effectively_once=True, initial_position="earliest",
                      returns_to=out)
    async def handle(name: str) -> str:
        if name == "a1":
            await eventually(lambda: bus.running and bus.running[0].in_flight >= 3, what="a2 and b1 received")
        handled.append(name)
        return name

    async with EventBus(dedup, routers=[router]) as bus:
        for name, key in (("a1", "a"), ("a2", "a"), ("b1", "b")):
            await bus.publish(topic, name, key=key)
        async with running(bus):
            await eventually(lambda: len(handled) == 3, timeout=15, what="every message handled")
    assert handled == ["a1", "a2", "b1"]


async def test_a_request_made_in_an_effectively_once_handler_is_answered(
    pulsar: dict, dedup: Settings, topic: str
) -> None:
    """A request goes at least once (its rerun asks anew): it must still go, and the answer become an output."""
    out = f"{topic}-out"
    router = Router()

    @router.subscribe(f"{topic}-ask", "answer", initial_position="earliest")
    async def answer(n: int) -> int:
        return n * 10

    @router.subscribe(topic, "g", effectively_once=True, returns_to=out, initial_position="earliest")
    async def handle(n: int, bus: EventBus) -> int:
        return await bus.request(f"{topic}-ask", n, response_type=int, timeout=10)

    async with EventBus(dedup, routers=[router]) as bus, running(bus):
        for n in range(3):
            await bus.publish(topic, n, key=str(n))
        await eventually(lambda: len(outputs(pulsar, out)) == 3, timeout=30, what="three answers stored")
    assert outputs(pulsar, out) == collections.Counter({b"0": 1, b"10": 1, b"20": 1})
