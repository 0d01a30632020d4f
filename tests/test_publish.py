"""Confirmed publishing: one receipt speaks for a key's batch, and never for a message it did not cover."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventbus import EventBus, Message, PublishError, Router, Settings
from eventbus.broker.embedded import start_broker as _start, stop_broker as _stop

from .conftest import eventually, id_of, read_stored, running
from .pulsar_admin import admin


async def _read_back(settings: Settings, topic: str, want: set[int]) -> dict[int, Message]:
    seen: dict[int, Message] = {}
    router = Router()

    @router.subscribe(topic, "check", subscription_type="exclusive", initial_position="earliest")
    async def h(n: int, msg: Message) -> None:
        seen[n] = msg

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await eventually(lambda: want <= seen.keys(), timeout=60, what=f"{len(want)} messages read back")
    return seen


async def test_every_message_of_a_burst_gets_the_id_the_broker_stored_it_under(settings: Settings, topic: str) -> None:
    # Many keys, many messages per key in one event-loop turn: the batches the
    # receipts speak for, each message's id told apart by its batch index.
    async with EventBus(settings, routers=[]) as bus:
        ids = await asyncio.gather(*(bus.publish(topic, n, key=f"k{n % 7}") for n in range(700)))
        more = await bus.publish_batch(topic, range(700, 1000), key="one")
        single = await bus.publish(topic, 1000)
    published = dict(enumerate([*ids, *more, single]))
    assert len({str(i) for i in published.values()}) == 1001, "ids are distinct"
    seen = await _read_back(settings, topic, set(published))
    assert {n: str(msg.message_id) for n, msg in seen.items()} == {n: str(i) for n, i in published.items()}


@pytest.mark.slow
async def test_a_broker_killed_mid_burst_leaves_no_unconfirmed_publish_reported_confirmed(
    tmp_path: Path, topic: str
) -> None:
    data_dir = tmp_path / "broker"
    data_dir.mkdir()
    url, pid = _start(data_dir, 20)
    port = int(url.rsplit(":", 1)[1])
    settings = Settings(_env_file=None, url=url, producer_send_timeout_ms=3000)
    confirmed: dict[int, object] = {}
    failed: dict[int, BaseException] = {}
    tasks, each = 100, 200
    total = tasks * each

    async def publisher(t: int) -> None:
        for n in range(t * each, (t + 1) * each):
            try:
                confirmed[n] = await bus.publish(topic, n, key=f"k{t % 13}")
            except PublishError as exc:
                failed[n] = exc

    try:
        async with EventBus(settings, routers=[]) as bus:
            async with anyio.create_task_group() as tg:
                for t in range(tasks):
                    tg.start_soon(publisher, t)
                await eventually(lambda: len(confirmed) >= 3000, what="a part of the burst to be confirmed")
                os.kill(pid, signal.SIGKILL)  # with about `tasks` publishes in flight
                await eventually(lambda: failed, timeout=30, what="a publish to time out")
                # Back on the same port: the publishers go on and are confirmed again.
                _, pid = _start(data_dir, 20, port=port)
                after = len(confirmed)
                await eventually(lambda: len(confirmed) > after, timeout=30, what="publishes after the restart")
        assert len(confirmed) + len(failed) == total, "every publish either returned an id or raised"
        assert failed and all("Timeout" in str(e) or "AlreadyClosed" in str(e) for e in failed.values())
        assert all(e.maybe_stored for e in failed.values()), "a timeout cannot tell whether the broker stored it"
        seen = await _read_back(settings, topic, set(confirmed))  # fails naming the count if one is missing
    finally:
        _stop(pid)
    assert all(str(seen[n].message_id) == str(i) for n, i in confirmed.items())
    print(f"confirmed {len(confirmed)}, raised {len(failed)}, stored {len(seen)}")


async def test_publish_slots_make_the_excess_wait_and_a_cancelled_waiter_passes_its_turn_on() -> None:
    from eventbus.publishing.producers import Slots

    slots = Slots(1)
    await slots.acquire()
    first = asyncio.ensure_future(slots.acquire())
    second = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not first.done() and not second.done(), "no slot free: both wait"
    slots.release()  # wakes the first waiter ...
    first.cancel()  # ... which is cancelled before it runs: the second must get the slot
    with anyio.fail_after(5):
        await second
    assert first.cancelled() and slots.free == 0


def _mismatches(returned: dict[bytes, object], stored: dict[bytes, list[tuple[int, ...]]]) -> list[str]:
    """Every publish whose outcome disagrees with what the broker stored."""
    bad = []
    for payload, outcome in returned.items():
        where = stored.get(payload, [])
        if isinstance(outcome, PublishError):
            if where and not outcome.maybe_stored:
                bad.append(f"{payload!r} raised {outcome} (maybe_stored=False) but is stored at {where}")
        elif isinstance(outcome, BaseException):
            bad.append(f"{payload!r} raised {outcome!r}")
        elif id_of(outcome) not in where:
            bad.append(f"{payload!r} returned {id_of(outcome)} but is stored at {where or 'nowhere'}")
    return bad


async def _outcomes(coros: dict[bytes, Any], timeout: float) -> dict[bytes, object]:
    """Run publishes to the end; one still pending after `timeout` fails the test."""
    tasks = {payload: asyncio.ensure_future(coro) for payload, coro in coros.items()}
    done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} of {len(tasks)} publishes still pending after {timeout}s"
    return {p: (t.exception() or t.result()) for p, t in tasks.items()}


@pytest.mark.pulsar
@pytest.mark.parametrize("partitions", [1, 3])
async def test_partitioned_topics_return_the_stored_id_and_every_publish_resolves(
    pulsar: dict, topic: str, partitions: int
) -> None:
    # One partition was the trap: the client's partitioned producer ignores a flush
    # asked for while an earlier one waits, so grouped sends stayed in its buffer.
    full = f"persistent://public/default/{topic}"
    admin(pulsar, "PUT", f"/admin/v2/persistent/public/default/{topic}/partitions", partitions)
    settings = Settings(
        _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], producer_send_timeout_ms=2000,
        producer_batching_max_messages=3,
    )
    returned: dict[bytes, object] = {}
    async with EventBus(settings, routers=[]) as bus:
        returned[b"warm"] = await bus.publish(topic, b"warm", key="a")
        # A publish per loop turn, one while the last still waits for its receipt.
        first = asyncio.ensure_future(bus.publish(topic, b"a1", key="a"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second = asyncio.ensure_future(bus.publish(topic, b"b1", key="b"))
        returned.update(await _outcomes({b"a1": first, b"b1": second}, timeout=10))
        # Bursts that overfill a 3-message batch, many keys, large payloads.
        burst = {f"m{n:04d}".encode() + b"." * (n % 3) * 20_000: n for n in range(600)}
        returned.update(await _outcomes({p: bus.publish(topic, p, key=f"k{n % 20}") for p, n in burst.items()}, 30))
        batch = [f"b{n:04d}".encode() for n in range(2000)]
        returned.update(zip(batch, await bus.publish_batch(topic, batch, key="one")))
    stored = await anyio.to_thread.run_sync(read_stored, settings.url, settings.jwt(), full, partitions)
    assert _mismatches(returned, stored) == []
    assert len(returned) == 2603


async def test_close_settles_every_accepted_publish_truly_and_refuses_new_ones(settings: Settings, topic: str) -> None:
    settings = settings.model_copy(update={"producer_max_pending_messages": 100})
    bus = EventBus(settings, routers=[])
    await bus.start()
    url = bus.url
    try:
        await bus.publish(topic, b"warm")
        # Most of these wait for one of the 100 pending slots when close() begins.
        accepted = {f"m{n:04d}".encode(): bus.publish(topic, f"m{n:04d}".encode(), key=f"k{n % 50}") for n in range(2000)}
        tasks = {p: asyncio.ensure_future(c) for p, c in accepted.items()}
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(bus.close())
        await asyncio.sleep(0)
        with pytest.raises(PublishError, match="BusClosed.*the bus is closed") as during:
            await bus.publish(topic, b"during close")
        await closing
    finally:
        await bus.close()
    with pytest.raises(PublishError, match="BusClosed") as after:
        await bus.publish(topic, b"after close")
    assert during.value.maybe_stored is False and after.value.maybe_stored is False
    returned = await _outcomes(dict(tasks), timeout=5)
    stored = await anyio.to_thread.run_sync(read_stored, url, settings.jwt(), settings.topic(topic))
    assert _mismatches(returned, stored) == []
    assert all(not isinstance(o, BaseException) for o in returned.values()), "accepted before close: all stored"
    assert b"during close" not in stored and b"after close" not in stored


async def test_properties_count_toward_a_batch_so_small_payloads_with_big_properties_fit(
    settings: Settings, topic: str
) -> None:
    # 1,000 messages of 5 B with a 6,000-character property: 6 MB as one batch, over the broker's 5 MB.
    settings = settings.model_copy(update={"producer_compression": "none"})
    async with EventBus(settings, routers=[]) as bus:
        url = bus.url
        payloads = {f"P{n:04d}".encode(): bus.publish(topic, f"P{n:04d}".encode(), key="k", properties={"blob": "x" * 6000}) for n in range(1000)}
        returned = await _outcomes(payloads, timeout=60)
    stored = await anyio.to_thread.run_sync(read_stored, url, settings.jwt(), settings.topic(topic))
    assert _mismatches(returned, stored) == []
