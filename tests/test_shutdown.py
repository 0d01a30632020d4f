"""Graceful shutdown in-process: in-flight work finishes and is acknowledged, queued work is redelivered."""

from __future__ import annotations

import asyncio

import anyio

from eventbus import EventBus, Router, Settings

from .conftest import eventually, running


async def test_in_flight_handler_finishes_is_acked_and_queued_messages_are_redelivered(
    settings: Settings, topic: str
) -> None:
    started = anyio.Event()
    release = anyio.Event()
    first: list[int] = []

    router = Router()

    @router.subscribe(topic, "g", subscription_type="exclusive", initial_position="earliest")
    async def slow(n: int) -> None:
        if n == 1:
            started.set()
            await release.wait()
        first.append(n)

    async with EventBus(settings, routers=[router]) as bus:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            for n in (1, 2, 3):  # one at a time, so each is a batch of its own (see docs, Shutdown: batches)
                await bus.publish(topic, n, key="same")
            await started.wait()
            bus.stop()  # 1 is in flight; 2 and 3 wait behind it on the same key
            release.set()
        assert first == [1], "the in-flight handler finishes; nothing new starts after stop"

        second: list[int] = []
        again = Router()
        again.subscribe(topic, "g", subscription_type="exclusive", initial_position="earliest")(second.append)
        async with EventBus(settings, routers=[again]) as bus2, running(bus2):
            await bus2.publish(topic, 99, key="same")
            await eventually(lambda: 99 in second, what="the marker")
    assert second == [2, 3, 99], "1 was acknowledged; 2 and 3 were never handled, so they come back first"


async def test_drain_timeout_cancels_a_stuck_handler_and_leaves_its_message(settings: Settings, topic: str) -> None:
    router = Router()
    started = anyio.Event()
    handled: list[int] = []

    @router.subscribe(topic, "g", subscription_type="exclusive", initial_position="earliest")
    async def stuck(n: int) -> None:
        if not started.is_set():
            started.set()
            await anyio.sleep_forever()
        handled.append(n)

    quick = settings.model_copy(update={"shutdown_drain_timeout": 0.2})
    async with EventBus(quick, routers=[router]) as bus:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            await bus.publish(topic, 1, key="k")
            await started.wait()
            bus.stop()
    assert handled == []

    # The same group again: the cancelled message was never acknowledged.
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await eventually(lambda: handled == [1], what="the redelivered message")


async def test_a_sync_handler_may_stop_the_bus_from_its_thread(settings: Settings, topic: str) -> None:
    router = Router()
    handled: list[int] = []
    bus = EventBus(settings, routers=[router])

    @router.subscribe(topic, "g", subscription_type="exclusive", initial_position="earliest")
    def last_one(n: int) -> None:  # runs in a worker thread
        handled.append(n)
        bus.stop()

    async with bus:
        await bus.publish(topic, 1, key="k")
        with anyio.fail_after(30):
            await bus.run(handle_signals=False)  # returns: the stop reached the loop from the thread
        assert handled == [1]

        again = Router()
        second: list[int] = []
        again.subscribe(topic, "g", subscription_type="exclusive", initial_position="earliest")(second.append)
        async with EventBus(settings, routers=[again]) as bus2, running(bus2):
            await bus2.publish(topic, 99, key="k")
            await eventually(lambda: 99 in second, what="the marker")
    assert second == [99], "the message whose handler stopped the bus was acknowledged"


async def _handled_by_a_second_worker(settings: Settings, topic: str, seen: list[tuple[str, int]]) -> None:
    """Run a second worker of the group until it has handled a marker published after everything else."""
    again = Router()

    @again.subscribe(topic, "g", concurrency=8, initial_position="earliest")
    async def second(n: int) -> None:
        seen.append(("second", n))

    async with EventBus(settings, routers=[again]) as bus, running(bus):
        await bus.publish(topic, -1, key="marker")
        await eventually(lambda: ("second", -1) in seen, what="the second worker to reach the marker")


async def test_a_graceful_stop_hands_over_nothing_it_handled_from_a_batch(settings: Settings, topic: str) -> None:
    # The five travel in one batch; the client acknowledges a batch only whole.
    router = Router()
    seen: list[tuple[str, int]] = []
    started = anyio.Event()
    release = anyio.Event()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def first(n: int) -> None:
        if n == 0:
            started.set()
            await release.wait()
        seen.append(("first", n))

    async with EventBus(settings, routers=[router]) as bus:
        await bus.publish_batch(topic, range(5))
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            await started.wait()
            bus.stop()
            release.set()
    await _handled_by_a_second_worker(settings, topic, seen)
    handled = sorted(n for _, n in seen if n >= 0)
    assert handled == [0, 1, 2, 3, 4], f"every message exactly once across the two workers: {seen}"


async def test_a_graceful_stop_with_many_keys_in_flight_hands_over_each_message_once(
    settings: Settings, topic: str
) -> None:
    router = Router()
    seen: list[tuple[str, int]] = []
    release = anyio.Event()
    busy = 0

    @router.subscribe(topic, "g", concurrency=8, initial_position="earliest")
    async def first(n: int) -> None:
        nonlocal busy
        busy += 1
        await release.wait()
        seen.append(("first", n))

    async with EventBus(settings, routers=[router]) as bus:
        for key in range(20):  # a batch per key, and bursts the producer groups by key
            await bus.publish_batch(topic, range(key * 100, key * 100 + 10), key=f"k{key}")
        await asyncio.gather(*(bus.publish(topic, 5000 + n, key=f"k{n % 20}") for n in range(200)))
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            await eventually(lambda: busy >= 8, what="eight keys in flight")
            bus.stop()
            release.set()
    await _handled_by_a_second_worker(settings, topic, seen)
    expected = sorted([k * 100 + i for k in range(20) for i in range(10)] + [5000 + n for n in range(200)])
    handled = sorted(n for _, n in seen if n >= 0)
    assert handled == expected, f"{len(handled)} handlings of {len(expected)} messages"
    for key in range(20):
        order = [n for _, n in seen if n >= 0 and (n % 20 if n >= 5000 else n // 100) == key]
        assert order == sorted(order), f"key k{key} out of order across the two workers: {order}"
