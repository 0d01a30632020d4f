"""Batch handlers on a real broker: sizes, partial failures, undecodable payloads, order per key, a stop mid-batch."""

import collections

import anyio
import pytest
from pydantic import BaseModel

from eventbus import Batch, BatchFailed, EventBus, Message, Reject, Router, Settings
from eventbus.testing import Harness

from .conftest import eventually, running


class Record(BaseModel):
    n: int


async def test_a_batch_handler_gets_up_to_max_messages_decoded_with_their_messages(settings: Settings, topic: str) -> None:
    batches: list[list[int]] = []
    router = Router()

    @router.subscribe(topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(30, 1.0))
    async def load(records: list[Record], messages: list[Message]) -> None:
        assert [m.data for m in messages] == [r.model_dump_json().encode() for r in records]
        batches.append([r.n for r in records])

    async with EventBus(settings, routers=[router]) as bus:
        await bus.publish_batch(topic, [Record(n=n) for n in range(100)])  # stored before the worker starts
        async with running(bus):
            await eventually(lambda: sum(map(len, batches)) == 100, what="all 100")
    assert sorted(n for batch in batches for n in batch) == list(range(100))
    assert max(map(len, batches)) == 30 and all(len(b) <= 30 for b in batches)


async def test_batch_failed_retries_only_the_named_and_acknowledges_the_rest(settings: Settings, topic: str) -> None:
    seen: list[list[int]] = []
    router = Router()

    @router.subscribe(
        topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(10, 1.0),
        max_retries=2, retry_backoff=0,
    )
    async def load(records: list[Record]) -> None:
        seen.append([r.n for r in records])
        failed: dict[int, BaseException] = {}
        for i, r in enumerate(records):
            if r.n == 3:
                failed[i] = ValueError("three is never right")
            elif r.n == 5:
                failed[i] = Reject("five is refused")
            elif r.n == 7 and len(seen) == 1:
                failed[i] = TimeoutError("seven, once")
        if failed:
            raise BatchFailed(failed)

    async with EventBus(settings, routers=[]) as publisher:
        await publisher.publish_batch(topic, [Record(n=n) for n in range(10)])
    async with Harness(settings, [router]) as app:
        await eventually(lambda: len(app.dead_letters) == 2, what="3 and 5 dead-lettered")
        await app.wait_handled(8, topic=topic)
    assert seen == [list(range(10)), [3, 7], [3]]
    dead = {d.data: (d.reason, d.error_type, d.attempts) for d in app.dead_letters}
    assert dead == {b'{"n":3}': ("handler-failed", "ValueError", 3), b'{"n":5}': ("rejected", "Reject", 1)}
    ok = collections.Counter(h.payload.n for h in app.handled if h.outcome == "ok")
    assert ok == {n: 1 for n in (0, 1, 2, 4, 6, 7, 8, 9)}


async def test_undecodable_payloads_are_dead_lettered_before_the_batch(settings: Settings, topic: str) -> None:
    seen: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(10, 1.0))
    async def load(records: list[Record]) -> None:
        seen.extend(r.n for r in records)

    async with EventBus(settings, routers=[]) as publisher:
        await publisher.publish_batch(topic, [{"n": 1}, {"n": "not a number"}, b"\xff\xfe", {"n": 4}])
    async with Harness(settings, [router]) as app:
        await eventually(lambda: len(app.dead_letters) == 2 and len(seen) == 2, what="two handled, two dead")
    assert sorted(seen) == [1, 4]
    assert sorted(d.reason for d in app.dead_letters) == ["undecodable", "undecodable"]


async def test_a_whole_batch_failure_is_retried_as_a_batch_then_each_is_dead_lettered(
    settings: Settings, topic: str
) -> None:
    calls: list[list[int]] = []
    router = Router()

    @router.subscribe(
        topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(5, 1.0),
        max_retries=1, retry_backoff=0,
    )
    async def load(records: list[Record]) -> None:
        calls.append([r.n for r in records])
        raise ConnectionError("warehouse down")

    async with EventBus(settings, routers=[]) as publisher:
        await publisher.publish_batch(topic, [Record(n=n) for n in range(5)])
    async with Harness(settings, [router]) as app:
        await eventually(lambda: len(app.dead_letters) == 5, what="all five dead-lettered")
    assert calls == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert {(d.reason, d.error, d.attempts) for d in app.dead_letters} == {("handler-failed", "warehouse down", 2)}


async def test_order_per_key_holds_through_batches_at_concurrency_8(settings: Settings, topic: str) -> None:
    """64 keys, 1,280 messages, key_shared, eight batches in flight: a key never twice in flight, always in order."""
    in_flight: set[str] = set()
    order: dict[str, list[int]] = collections.defaultdict(list)
    overlaps: list[str] = []
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", concurrency=8, batch=Batch(50, 0.05))
    async def load(records: list[dict], messages: list[Message]) -> None:
        keys = [m.key or "" for m in messages]
        overlaps.extend(k for k in keys if k in in_flight)
        assert len(set(keys)) == len(keys), f"a key twice in one batch: {keys}"
        in_flight.update(keys)
        await anyio.sleep(0.001 * (len(records) % 3))  # batches finish out of order
        for key, record in zip(keys, records):
            order[key].append(record["seq"])
        in_flight.difference_update(keys)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        for start in range(0, 1280, 128):
            for key in range(64):
                await bus.publish_batch(topic, [{"seq": s} for s in range(start + key, start + 128, 64)], key=f"k{key}")
        await eventually(lambda: sum(map(len, order.values())) == 1280, what="all 1,280", timeout=60)
    assert overlaps == []
    assert all(seqs == sorted(seqs) for seqs in order.values()), {k: v for k, v in order.items() if v != sorted(v)}
    assert sorted(s for seqs in order.values() for s in seqs) == list(range(1280))


async def test_a_stop_mid_batch_finishes_it_and_nothing_is_handled_twice(settings: Settings, topic: str) -> None:
    handled: list[int] = []
    started, release = anyio.Event(), anyio.Event()
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", batch=Batch(20, 0.2))
    async def load(records: list[Record]) -> None:
        started.set()
        await release.wait()
        handled.extend(r.n for r in records)

    async with EventBus(settings, routers=[]) as publisher:
        for n in range(200):
            await publisher.publish(topic, Record(n=n), key=f"k{n % 40}")
    async with EventBus(settings, routers=[router]) as bus:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            await started.wait()
            bus.stop()  # the first batch is in flight
            release.set()
    first = list(handled)
    assert first, "the batch in flight finished"
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await eventually(lambda: len(set(handled)) == 200, what="the rest", timeout=60)
    assert sorted(handled) == list(range(200)), f"handled twice: {[n for n, c in collections.Counter(handled).items() if c > 1]}"


def test_batch_options_are_checked_at_registration() -> None:
    router = Router()
    with pytest.raises(ValueError, match=r"Batch\(max_messages=0\): it must be an int >= 1"):
        Batch(max_messages=0)
    with pytest.raises(TypeError, match=r"annotate 'record' as list\[Record\]"):

        @router.subscribe("t", "g", batch=Batch())
        async def one(record: Record) -> None: ...

    with pytest.raises(ValueError, match="returns_to is for handlers of one message"):

        @router.subscribe("t", "h", batch=Batch(), returns_to="out")
        async def many(records: list[Record]) -> None: ...


async def test_middleware_with_on_batch_sees_every_batch_bus_first_and_a_plain_one_stays_out(
    settings: Settings, topic: str
) -> None:
    """Batch handlers ran without any attempt middleware: a latency or tenant middleware was silent for them."""
    seen: list[tuple[str, list[str]]] = []
    plain_calls: list[int] = []

    class Tenants:
        def __init__(self, name: str) -> None:
            self.name = name

        async def on_batch(self, messages: list[Message], call_next: object) -> object:
            seen.append((self.name, [m.properties["tenant"] for m in messages]))
            return await call_next(messages)  # type: ignore[operator]

    async def plain(message: Message, call_next: object) -> object:  # one message's side: not for a batch
        plain_calls.append(1)
        return await call_next(message)  # type: ignore[operator]

    router = Router(middleware=[Tenants("router"), plain])
    loaded: list[int] = []

    @router.subscribe(topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(10, 0.5))
    async def load(records: list[Record]) -> None:
        loaded.extend(r.n for r in records)

    async with EventBus(settings, routers=[router], middleware=[Tenants("bus")]) as bus:
        for n in range(20):
            await bus.publish(topic, Record(n=n), properties={"tenant": f"t{n % 3}"})
        async with running(bus):
            await eventually(lambda: len(loaded) == 20, what="all 20")
    assert plain_calls == []
    assert [name for name, _ in seen] == ["bus", "router"] * (len(seen) // 2), "the bus's outside the router's"
    assert sorted(t for name, tenants in seen if name == "router" for t in tenants) == sorted(
        f"t{n % 3}" for n in range(20)
    )


async def test_an_on_batch_passing_part_of_the_batch_fails_it_naming_the_middleware(settings: Settings, topic: str) -> None:
    class Halves:
        async def on_batch(self, messages: list[Message], call_next: object) -> object:
            return await call_next(messages[: len(messages) // 2])  # type: ignore[operator]

    router = Router(middleware=[Halves()])
    loaded: list[int] = []

    @router.subscribe(topic, "g", initial_position="earliest", batch=Batch(10, 0.2), max_retries=0)
    async def load(records: list[Record]) -> None:
        loaded.extend(r.n for r in records)

    async with Harness(settings, [router]) as app:
        await app.publish(topic, Record(n=1))
        await app.publish(topic, Record(n=2))
        dead = await app.wait_dead_lettered(2)
    assert loaded == [] and {d.error_type for d in dead} == {"MiddlewareError"}
    assert all("Halves.on_batch passed" in d.error and "pass them all" in d.error for d in dead)


async def test_call_handler_runs_a_batch_handlers_on_batch_middleware_as_the_worker_does() -> None:
    from eventbus.testing import call_handler

    seen: list[int] = []

    class Count:
        async def on_batch(self, messages: list[Message], call_next: object) -> object:
            seen.append(len(messages))
            return await call_next(messages)  # type: ignore[operator]

    router = Router(middleware=[Count()])

    @router.subscribe("records", "g", batch=Batch(10, 0.2))
    async def load(records: list[Record]) -> None: ...

    result = await call_handler(load, [Record(n=1), Record(n=2)], routers=[router])
    assert result.outcome == "ok" and seen == [2]
