"""Confirmed publishing: one receipt speaks for a key's batch, and never for a message it did not cover."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import anyio
import pytest

from eventbus import EventBus, Message, PublishError, Router, Settings
from eventbus.embedded import _start, _stop

from .conftest import eventually, running


async def _read_back(settings: Settings, topic: str, want: set[int]) -> dict[int, Message]:
    seen: dict[int, Message] = {}
    router = Router()

    @router.subscribe(topic, "check", subscription="exclusive", initial_position="earliest")
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
        seen = await _read_back(settings, topic, set(confirmed))  # fails naming the count if one is missing
    finally:
        _stop(pid)
    assert all(str(seen[n].message_id) == str(i) for n, i in confirmed.items())
    print(f"confirmed {len(confirmed)}, raised {len(failed)}, stored {len(seen)}")


async def test_publish_slots_make_the_excess_wait_and_a_cancelled_waiter_passes_its_turn_on() -> None:
    from eventbus.producers import _Slots

    slots = _Slots(1)
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
