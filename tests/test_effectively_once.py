"""Effectively-once outputs: a handler's outputs stored once however often it runs, read back with the raw client."""

from __future__ import annotations

import collections
import logging
import random
import uuid
from typing import Any

import anyio
import pytest

from eventbus import EventBus, Message, Reject, Router, Settings
from eventbus.broker.client import stored

from .conftest import eventually, read_stored, running

pytestmark = pytest.mark.pulsar


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
    pulsar: dict, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`public/default` sets no deduplication: one WARNING naming the namespace and the fix; nothing dropped."""
    settings = Settings(
        _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], admin_url=pulsar["admin_url"],
        admin_token=pulsar["admin_token"], shutdown_drain_timeout=10,
    )
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
    said = [r.getMessage() for r in caplog.records if "effectively_once is off" in r.getMessage()]
    assert len(said) == 1 and "public/default" in said[0] and "EVENTBUS_DEDUPLICATION=true" in said[0], said
    found = read_stored(pulsar["service_url"], pulsar["admin_token"], f"persistent://public/default/{out}")
    assert len(found[b"1"]) == 2, "at least once: the rerun's output stored again, nothing dropped"


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, "effectively_once=True needs subscription_type='failover'"),
        ({"subscription_type": "shared"}, "'shared' shares a partition"),
        ({"subscription_type": "failover", "effectively_once": "yes"}, "effectively_once='yes' must be True or False"),
    ],
)
def test_effectively_once_where_it_cannot_hold_is_refused_at_registration(options: dict, words: str) -> None:
    router = Router()
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        router.subscribe("orders", "g", **{"effectively_once": True, **options})(lambda n: None)
