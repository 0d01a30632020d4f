"""Replays of one group under pressure: started together, with other filters, killed half way; nothing lost.

Every check reads the retry topic back with a raw client and compares it with what the dead-letter
topic holds and what the replays reported. `EB_REPLAY_ROUNDS` and `EB_REPLAY_DEAD_LETTERS` make the
adversarial run longer (the issue's: 20 rounds of 2,000).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from typing import Any

import pytest

from eventbus import EventBus, EventBusError, Settings
from eventbus.operating import replay

from .conftest import raw_client, read_stored

pytestmark = pytest.mark.slow

#: The two replays overlapped (one refused) in 8 of 8 rounds on both brokers (2026-12-05), so 3 rounds run the race
#: (a round that misses it would still check the read-back); 6 cost CI 100 s more for no failure found in any run.
ROUNDS = int(os.environ.get("EB_REPLAY_ROUNDS", "3"))
DEAD_LETTERS = int(os.environ.get("EB_REPLAY_DEAD_LETTERS", "100"))
GROUP = "billing"


def _dedup(settings: Settings) -> Settings:
    """Apache Pulsar's namespace with deduplication on (the test broker's `public/dedup`)."""
    return settings.model_copy(update={"namespace": "dedup"}) if settings.url else settings


async def _seed(settings: Settings, topic: str, count: int) -> list[bytes]:
    """`count` dead letters of GROUP on `topic`, error types KeyError and ValueError in turn; their payloads."""
    dead_letters, _ = replay.topics(settings, topic, GROUP)
    async with EventBus(settings, routers=[]) as bus:
        client = raw_client(bus.url, settings.jwt())
        try:  # the worker's keeping subscription, made before the first dead letter as the worker makes it
            client.subscribe(dead_letters, "eventbus-replay", initial_position=_earliest()).close()
        finally:
            client.close()
        payloads = [f'{{"n":{n}}}'.encode() for n in range(count)]
        await asyncio.gather(*(
            bus.publish(dead_letters, p, key=f"k{n % 7}", properties={
                "eventbus-dlq-reason": "handler-failed", "eventbus-error-type": "KeyError" if n % 2 else "ValueError",
                "eventbus-error": f"order {n}", "eventbus-attempts": "1", "eventbus-subscription": GROUP,
            })
            for n, p in enumerate(payloads)
        ))
    return payloads


def _earliest() -> Any:
    import pulsar

    return pulsar.InitialPosition.Earliest


def _retry_stored(settings: Settings, url: str, topic: str) -> Counter[bytes]:
    _, retries = replay.topics(settings, topic, GROUP)
    return Counter({payload: len(ids) for payload, ids in read_stored(url, settings.jwt(), retries).items()})


async def _url(settings: Settings) -> str:
    async with EventBus(settings, routers=[]) as bus:
        return bus.url


@pytest.mark.parametrize("filters", [("KeyError", "ValueError"), ("KeyError", None)], ids=["two-filters", "filter-and-all"])
async def test_replays_started_together_store_every_dead_letter_they_acknowledge(
    settings: Settings, filters: tuple[str | None, str | None]
) -> None:
    settings = _dedup(settings)
    url = await _url(settings)
    refused = 0
    for _ in range(ROUNDS):
        topic = f"race-{uuid.uuid4().hex[:10]}"
        payloads = await _seed(settings, topic, DEAD_LETTERS)
        outcomes = await asyncio.gather(
            *(replay.replay(settings, topic, GROUP, error_type=f) for f in filters), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, EventBusError) and "another replay of" in str(outcome), repr(outcome)
                refused += 1
            else:
                assert outcome.failed == []
        # What they acknowledged is gone from the subscription; what they did not, a last replay sends.
        last = await replay.replay(settings, topic, GROUP)
        assert last.failed == []
        reports = [o for o in outcomes if not isinstance(o, BaseException)] + [last]
        stored = _retry_stored(settings, url, topic)
        assert stored == Counter(payloads), "each dead letter stored on the retry topic once"
        assert sorted(d.data for r in reports for d, _ in r.replayed) == sorted(payloads), "each acknowledged once"
        assert await replay.show(settings, topic, GROUP) == [], "nothing left waiting"
    assert refused > 0, "the replays never overlapped: the race was not run"


async def test_a_receipt_for_a_dropped_duplicate_is_not_taken_for_a_stored_resend(
    pulsar: dict, settings: Settings
) -> None:
    # Under the group's producer name, a sequence id above every dead letter's position is stored first:
    # each resend is then dropped as a duplicate (a receipt of -1:-1:-1:0) though none is on the retry topic.
    if not settings.url:
        pytest.skip("deduplication is Apache Pulsar's")
    settings = _dedup(settings)
    topic = f"dup-{uuid.uuid4().hex[:10]}"
    payloads = await _seed(settings, topic, 50)
    _, retries = replay.topics(settings, topic, GROUP)
    client = raw_client(settings.url, settings.jwt())
    try:
        client.create_producer(retries, producer_name=f"eventbus-replay-{GROUP}").send(b"ahead", sequence_id=1 << 62)
    finally:
        client.close()
    report = await replay.replay(settings, topic, GROUP)
    assert report.failed == [] and len(report.replayed) == 50
    stored = _retry_stored(settings, settings.url, topic)
    assert stored == Counter([*payloads, b"ahead"])
    assert all(not new_id.startswith("-1:") for _, new_id in report.replayed if new_id)


async def test_a_filtered_replay_killed_anywhere_then_another_filter_stores_each_once(
    settings: Settings, subprocess_env: dict[str, str]
) -> None:
    """On Apache Pulsar with deduplication: each once. On the embedded broker: none missing, at least once."""
    settings = _dedup(settings)
    env = {**subprocess_env, "EVENTBUS_NAMESPACE": settings.namespace}
    url = await _url(settings)
    rng = random.Random(os.environ.get("EB_SEED", "replay-kill"))
    for _ in range(3):
        topic = f"kill-{uuid.uuid4().hex[:10]}"
        payloads = await _seed(settings, topic, 200)
        first = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "dlq", "replay", topic, GROUP, "--error-type", "KeyError"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert first.stdout is not None
        at = rng.randrange(1, 90)
        printed = [first.stdout.readline() for _ in range(at)]
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert all(line.startswith("replayed ") for line in printed), printed
        for error_type in ("ValueError", None):
            try:
                await replay.replay(settings, topic, GROUP, error_type=error_type)
            except EventBusError as exc:
                if settings.url or "may still hold the consumer of a replay that was killed" not in str(exc):
                    raise
                # pulsar-lite's, as in test_dead_letters' killed replay: it kept the SIGKILLed replay's consumer
                # (seen once in a clean-clone CI run). The docs' Guarantees, Left open, say so.
                pytest.xfail(f"pulsar-lite kept the SIGKILLed replay's consumer: {exc}")
        copies = _retry_stored(settings, url, topic)
        assert set(copies) == set(payloads), "none missing"
        if settings.url:
            assert set(copies.values()) == {1}, f"killed after {at}: deduplication drops what the killed one stored"
        else:
            assert sum(copies.values()) - len(payloads) <= at + 1
