"""Delivery against the embedded broker: payloads, validation, order, retries, dead letters."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from eventbus import Reject, EventBus, Message, PublishBatchError, PublishError, Router, Settings

from .conftest import eventually, running


class Order(BaseModel):
    id: str
    qty: int


@dataclasses.dataclass
class Point:
    x: int
    y: int


def dlq_reader(router: Router, settings: Settings, topic: str, group: str, into: list[Message]) -> None:
    @router.subscribe(settings.topic(topic) + f"-{group}-DLQ", "dlq-reader", initial_position="earliest")
    async def read(data: bytes, msg: Message) -> None:
        into.append(msg)


async def _round_trip(settings: Settings, topic: str, handler_type: Any, payload: Any) -> Any:
    router = Router()
    got: list[Any] = []

    async def handler(value, msg: Message) -> None:  # type: ignore[no-untyped-def]
        got.append((value, msg))

    handler.__annotations__["value"] = handler_type
    router.subscribe(topic, "g", initial_position="earliest")(handler)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        message_id = await bus.publish(topic, payload, key="k1", properties={"origin": "test"})
        await eventually(lambda: got, what="the message")
    value, msg = got[0]
    assert msg.message_id == message_id
    assert msg.key == "k1" and msg.properties["origin"] == "test" and msg.attempt == 1
    return value


@pytest.mark.parametrize(
    ("handler_type", "payload", "expected"),
    [
        (Order, Order(id="o-1", qty=2), Order(id="o-1", qty=2)),
        (dict, Point(1, 2), {"x": 1, "y": 2}),
        (dict, {"a": [1, 2]}, {"a": [1, 2]}),
        (list, [1, "two", None], [1, "two", None]),
        (Any, 42, 42),
        (Any, "hello", "hello"),
        (bytes, b"\x00\xffraw", b"\x00\xffraw"),
        (str, "caf\u00e9".encode(), "caf\u00e9"),
        (Point, {"x": 3, "y": 4}, Point(3, 4)),
        (list[int], [1, 2, 3], [1, 2, 3]),
    ],
    ids=["model", "dataclass", "dict", "list", "int", "str-json", "bytes", "utf8", "to-dataclass", "typed-list"],
)
async def test_round_trip_by_payload_kind(settings: Settings, topic: str, handler_type: Any, payload: Any, expected: Any) -> None:
    assert await _round_trip(settings, topic, handler_type, payload) == expected


async def test_json_payloads_say_so_and_bytes_do_not(settings: Settings, topic: str) -> None:
    router = Router()
    seen: list[Message] = []

    @router.subscribe(topic, "g", initial_position="earliest")
    async def h(data: bytes, msg: Message) -> None:
        seen.append(msg)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {"a": 1}, key="a")
        await bus.publish(topic, b"raw", key="a")
        await eventually(lambda: len(seen) == 2)
    assert seen[0].properties["content-type"] == "application/json"
    assert seen[1].properties["content-type"] == "application/octet-stream"


async def test_unencodable_payload_raises_type_error_before_sending(settings: Settings, topic: str) -> None:
    class Opaque:
        pass

    async with EventBus(settings, routers=[]) as bus:
        with pytest.raises(TypeError, match="Opaque"):
            await bus.publish(topic, Opaque())
        with pytest.raises(TypeError, match=r"payload #1: .*Opaque"):
            await bus.publish_batch(topic, [{"ok": 1}, Opaque()])
        assert bus.producer_topics == [], "nothing may be sent, not even a producer created"


async def test_invalid_payload_is_dead_lettered_and_the_worker_goes_on(settings: Settings, topic: str) -> None:
    router = Router()
    good: list[Order] = []
    dead: list[Message] = []

    @router.subscribe(topic, "g", initial_position="earliest")
    async def h(order: Order) -> None:
        good.append(order)

    dlq_reader(router, settings, topic, "g", dead)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {"id": "o-1", "qty": "many"}, key="k")
        await bus.publish(topic, b"\xff not json", key="k")
        await bus.publish(topic, Order(id="o-2", qty=1), key="k")
        await eventually(lambda: good and len(dead) == 2, what="one handled, two dead-lettered")
    assert [o.id for o in good] == ["o-2"]
    reasons = [m.properties for m in dead]
    assert all(p["eventbus-dlq-reason"] == "undecodable" for p in reasons)
    assert "qty" in reasons[0]["eventbus-error"] and "Order" in reasons[0]["eventbus-error"]
    assert "Invalid JSON" in reasons[1]["eventbus-error"]
    assert dead[1].data == b"\xff not json", "the original payload is kept"
    assert dead[0].properties["content-type"] == "application/json", "original properties are kept"


async def test_retry_then_success(settings: Settings, topic: str) -> None:
    router = Router()
    attempts: list[int] = []
    dead: list[Message] = []

    @router.subscribe(topic, "g", max_retries=3, retry_backoff=0.01, initial_position="earliest")
    async def flaky(body: dict, msg: Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt < 3:
            raise ConnectionError("downstream not ready")

    dlq_reader(router, settings, topic, "g", dead)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {"n": 1}, key="k")
        await bus.publish(topic, {"n": 2}, key="k")
        await eventually(lambda: len(attempts) == 6, what="three attempts for each message")
    assert attempts == [1, 2, 3, 1, 2, 3]
    assert dead == []


async def test_retries_exhausted_go_to_dead_letter_topic_with_reason(settings: Settings, topic: str) -> None:
    router = Router()
    attempts: list[int] = []
    dead: list[Message] = []

    @router.subscribe(topic, "g", max_retries=2, retry_backoff=0.01, initial_position="earliest")
    async def broken(body: dict, msg: Message) -> None:
        attempts.append(msg.attempt)
        raise RuntimeError(f"cannot handle {body['n']}")

    dlq_reader(router, settings, topic, "g", dead)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        message_id = await bus.publish(topic, {"n": 7}, key="k7", properties={"trace": "abc"})
        await eventually(lambda: dead, what="the dead letter")
    assert attempts == [1, 2, 3]
    msg = dead[0]
    assert msg.topic == settings.topic(topic) + "-g-DLQ"
    assert msg.key == "k7"
    assert msg.properties["trace"] == "abc"
    assert msg.properties["eventbus-dlq-reason"] == "handler-failed"
    assert msg.properties["eventbus-error-type"] == "RuntimeError"
    assert msg.properties["eventbus-error"] == "cannot handle 7"
    assert msg.properties["eventbus-attempts"] == "3"
    assert msg.properties["eventbus-original-topic"] == settings.topic(topic)
    ledger, entry, partition, batch = msg.properties["eventbus-original-message-id"].split(":")
    assert (int(ledger), int(entry), int(partition), int(batch)) == (
        message_id.ledger_id(), message_id.entry_id(), message_id.partition(), message_id.batch_index()
    ), "ledger:entry:partition:batch, as Pulsar's tools print it"


class CardDeclined(Exception):
    pass


@pytest.mark.parametrize("how", ["Reject", "reject_on"])
async def test_a_permanent_failure_skips_the_retries(settings: Settings, topic: str, how: str) -> None:
    router = Router()
    attempts: list[int] = []
    dead: list[Message] = []

    @router.subscribe(topic, "g", max_retries=5, retry_backoff=0.01, initial_position="earliest", reject_on=(CardDeclined,))
    async def charge(body: dict, msg: Message) -> None:
        attempts.append(msg.attempt)
        if body["n"] == 1:
            raise Reject("card declined") if how == "Reject" else CardDeclined("card declined")

    dlq_reader(router, settings, topic, "g", dead)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {"n": 1}, key="k")
        await bus.publish(topic, {"n": 2}, key="k")
        await eventually(lambda: dead and len(attempts) == 2, what="the dead letter and the next message")
    assert attempts == [1, 1], "no retry of the rejected message; the key goes on"
    props = dead[0].properties
    assert (props["eventbus-dlq-reason"], props["eventbus-attempts"], props["eventbus-error"]) == (
        "rejected", "1", "card declined",
    )
    assert props["eventbus-error-type"] == ("Reject" if how == "Reject" else "CardDeclined")


async def test_a_failure_logs_its_traceback_once_then_one_line_per_retry(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = Router()
    dead: list[Message] = []

    @router.subscribe(topic, "g", max_retries=2, retry_backoff=0.01, initial_position="earliest")
    async def broken(body: dict) -> None:
        raise RuntimeError("boom")

    dlq_reader(router, settings, topic, "g", dead)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        async with EventBus(settings, routers=[router]) as bus, running(bus):
            await bus.publish(topic, {"n": 1})
            await eventually(lambda: dead, what="the dead letter")
    failures = [r for r in caplog.records if "broken" in r.getMessage()]
    assert [r.levelname for r in failures] == ["WARNING", "WARNING", "ERROR"], [r.getMessage() for r in failures]
    assert [r.exc_info is not None for r in failures] == [True, False, True], "the first failure and the dead letter"
    assert "in broken" in caplog.text and 'raise RuntimeError("boom")' in caplog.text


async def test_key_order_holds_under_concurrency_and_retries(settings: Settings, topic: str) -> None:
    router = Router()
    seen: dict[str, list[int]] = collections.defaultdict(list)
    active = 0
    peak = 0
    failed_once: set[tuple[str, int]] = set()

    @router.subscribe(topic, "g", concurrency=8, retry_backoff=0.005, initial_position="earliest")
    async def h(body: dict, msg: Message) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await anyio.sleep(random.uniform(0, 0.003))
            ident = (body["key"], body["seq"])
            if body["seq"] % 7 == 3 and ident not in failed_once:
                failed_once.add(ident)
                raise RuntimeError("transient")
            seen[body["key"]].append(body["seq"])
        finally:
            active -= 1

    keys = [f"key-{i}" for i in range(12)]
    per_key = 40
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        for seq in range(per_key):
            await asyncio.gather(*(bus.publish(topic, {"key": k, "seq": seq}, key=k) for k in keys))
        await eventually(lambda: sum(map(len, seen.values())) == len(keys) * per_key, what="every message")
    for k in keys:
        assert seen[k] == list(range(per_key)), f"order broken for {k}"
    assert peak > 1, "handlers of different keys should run concurrently"
    assert peak <= 8


@pytest.mark.parametrize("kind", ["key_shared", "shared", "failover", "exclusive"])
async def test_each_subscription_type_delivers_every_message_once(settings: Settings, topic: str, kind: str) -> None:
    router = Router()
    got: list[int] = []

    @router.subscribe(topic, "g", subscription_type=kind, concurrency=4, initial_position="earliest")
    async def h(n: int) -> None:
        got.append(n)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish_batch(topic, range(100), key=None)
        await bus.publish_batch(topic, range(100, 200), key="same")
        await eventually(lambda: len(got) >= 200)
        await bus.publish(topic, -1)  # a marker after everything: nothing is handled twice before it
        await eventually(lambda: -1 in got)
    assert sorted(got) == [-1, *range(200)]
    if kind != "shared":
        keyed = [n for n in got if n >= 100]
        assert keyed == list(range(100, 200)), "one key is handled in publish order"


async def test_two_groups_each_get_every_message(settings: Settings, topic: str) -> None:
    router = Router()
    got: dict[str, list[int]] = {"a": [], "b": []}
    for group in got:
        router.subscribe(topic, group, initial_position="earliest")(lambda n, group=group: got[group].append(n))

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish_batch(topic, range(20), key="k")
        await eventually(lambda: len(got["a"]) == len(got["b"]) == 20)
    assert got["a"] == got["b"] == list(range(20))


async def test_sync_handler_runs_in_a_thread(settings: Settings, topic: str) -> None:
    import threading

    router = Router()
    threads: list[int] = []

    @router.subscribe(topic, "g", initial_position="earliest")
    def blocking(body: dict) -> None:
        threads.append(threading.get_ident())

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {})
        await eventually(lambda: threads)
    assert threads[0] != threading.get_ident()


async def test_handler_publishes_follow_up_events(settings: Settings, topic: str) -> None:
    router = Router()
    follow: list[dict] = []

    @router.subscribe(topic, "g", initial_position="earliest")
    async def step(body: dict, bus: EventBus) -> None:
        await bus.publish(topic + "-next", {"after": body["n"]}, key="k")

    @router.subscribe(topic + "-next", "g", initial_position="earliest")
    async def next_step(body: dict) -> None:
        follow.append(body)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {"n": 1})
        await eventually(lambda: follow)
    assert follow == [{"after": 1}]


async def test_publish_batch_reports_every_failure(settings: Settings, topic: str) -> None:
    too_big = os.urandom(6 * 1024 * 1024)  # incompressible: LZ4 would shrink repeated bytes
    async with EventBus(settings, routers=[]) as bus:
        with pytest.raises(PublishBatchError) as caught:
            await bus.publish_batch(topic, [b"a", too_big, b"b", too_big, b"c"])
    err = caught.value
    assert sorted(err.failures) == [1, 3]
    assert all(isinstance(e, PublishError) and "MessageTooBig" in str(e) for e in err.failures.values())
    assert err.message_ids[1] is None and err.message_ids[3] is None
    assert all(err.message_ids[i] is not None for i in (0, 2, 4))
    assert "2 of 5" in str(err)


async def test_publish_too_big_fails_clearly(settings: Settings, topic: str) -> None:
    async with EventBus(settings, routers=[]) as bus:
        with pytest.raises(PublishError, match="MessageTooBig.*maximum message size") as caught:
            await bus.publish(topic, os.urandom(6 * 1024 * 1024))
    assert caught.value.maybe_stored is False, "refused before storing: safe to publish again"


async def test_short_and_full_topic_names_meet(settings: Settings, topic: str) -> None:
    router = Router()
    got: list[int] = []
    router.subscribe(f"persistent://public/default/{topic}", "g", initial_position="earliest")(got.append)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, 5)
        await eventually(lambda: got)
    assert got == [5]


async def test_a_redelivered_copy_of_a_message_in_flight_or_acked_runs_once(settings: Settings, topic: str) -> None:
    router = Router()
    started = anyio.Event()
    release = anyio.Event()
    calls: list[int] = []

    @router.subscribe(topic, "g", subscription_type="shared", concurrency=4, initial_position="earliest")
    async def h(n: int) -> None:
        calls.append(n)
        if n == 1:
            started.set()
            await release.wait()

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, 1)
        await started.wait()
        runner = bus.running[0]
        runner.redeliver_unacknowledged()  # the broker sends message 1 again
        await eventually(lambda: runner.duplicates >= 1, what="the copy to arrive")
        release.set()
        await bus.publish(topic, 2)
        await eventually(lambda: 2 in calls)
    assert calls == [1, 2]


async def test_in_flight_work_is_bounded_by_max_in_flight(settings: Settings, topic: str) -> None:
    router = Router()
    release = anyio.Event()
    handled: list[int] = []

    @router.subscribe(topic, "g", subscription_type="shared", concurrency=4, initial_position="earliest")
    async def slow(n: int) -> None:
        await release.wait()
        handled.append(n)

    bounded = settings.model_copy(update={"consumer_max_in_flight": 20})
    async with EventBus(bounded, routers=[router]) as bus, running(bus):
        await bus.publish_batch(topic, range(200))
        runner = bus.running[0]
        await eventually(lambda: runner.in_flight == 20, what="the receiver to fill up to the bound")
        peak = 0
        with anyio.move_on_after(0.5):  # a window in which an unbounded receiver would take all 200
            while True:
                peak = max(peak, runner.in_flight)
                await anyio.sleep(0.01)
        assert peak == 20
        release.set()
        await eventually(lambda: len(handled) == 200, what="every message once the handlers are released")
    assert sorted(handled) == list(range(200))


async def test_a_member_joining_the_group_never_overtakes_a_key_in_flight(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The newcomer's consumer name sorts first: pulsar-lite's failover would make
    # it the active consumer at once, without handing it the message in flight.
    from eventbus.consuming import membership

    handled: list[tuple[str, int]] = []
    first_busy = anyio.Event()

    def member(name: str) -> Router:
        router = Router()

        @router.subscribe(topic, "g", initial_position="earliest")
        async def h(n: int) -> None:
            handled.append((name, n))
            if name == "first":
                first_busy.set()
                await anyio.sleep_forever()  # until its bus stops: left unacknowledged

        return router

    async with EventBus(settings, routers=[member("second")]) as second, anyio.create_task_group() as tg:
        first_settings = settings.model_copy(update={"shutdown_drain_timeout": 0.5})
        async with EventBus(first_settings, routers=[member("first")]) as first:
            monkeypatch.setattr(membership.socket, "gethostname", lambda: "z-first")
            async with running(first):
                await first.publish(topic, 1, key="k")
                with anyio.fail_after(20):
                    await first_busy.wait()
                monkeypatch.setattr(membership.socket, "gethostname", lambda: "a-second")
                await tg.start(lambda task_status: second.run(handle_signals=False, task_status=task_status))
                runner = second.running[0]
                await eventually(lambda: runner.state in ("standby", "consuming"), timeout=60, what="join")
                await first.publish(topic, 2, key="k")
        await eventually(lambda: ("second", 2) in handled, what="the second member to take over")
        second.stop()
    assert handled == [("first", 1), ("second", 1), ("second", 2)]


class _Ledger:
    """Every handler start and end across the members of a group, in the one event loop's order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int]] = []  # (member, "start"|"end", key, n)
        self.running: collections.Counter[str] = collections.Counter()
        self.overlaps = 0

    def router(self, member: str, topic: str, kind: str) -> Router:
        router = Router()

        @router.subscribe(topic, "g", subscription_type=kind, concurrency=4, initial_position="earliest")
        async def handle(n: int, msg: Message) -> None:
            key = msg.key or ""
            self.overlaps += self.running[key] > 0  # the same key running anywhere else
            self.running[key] += 1
            self.events.append((member, "start", key, n))
            try:
                await anyio.sleep(0.2)  # past Pulsar's one-second failover delay, with A still busy
            finally:
                self.running[key] -= 1
            self.events.append((member, "end", key, n))

        return router

    def reorders(self, published: list[tuple[str, int]]) -> int:
        first: dict[int, int] = {}
        for i, (_, what, _, n) in enumerate(self.events):
            if what == "start":
                first.setdefault(n, i)
        out = 0
        for key in {k for k, _ in published}:
            seen = [first[n] for k, n in published if k == key and n in first]
            out += sum(b < a for a, b in zip(seen, seen[1:]))
        return out


@pytest.mark.parametrize("partitions", [0, 2], ids=["topic", "2-partitions"])
@pytest.mark.parametrize("kind", ["failover", "key_shared", "exclusive"])
async def test_members_joining_and_leaving_never_run_a_key_twice_at_once_nor_out_of_order(
    settings: Settings, topic: str, kind: str, partitions: int, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eventbus.consuming import membership

    if partitions:
        if settings.uses_embedded:
            pytest.skip("the embedded broker has no partitioned topics")
        from .pulsar_admin import admin

        admin(request.getfixturevalue("pulsar"), "PUT", f"/admin/v2/persistent/public/default/{topic}/partitions", partitions)
    ledger = _Ledger()
    published = [(f"k{n % 4}", n) for n in range(48)]
    async with EventBus(settings, routers=[]) as publisher:
        for key, n in published:
            await publisher.publish(topic, n, key=key)
    leaving = settings.model_copy(update={"shutdown_drain_timeout": 10})
    async with anyio.create_task_group() as tg:
        async with EventBus(leaving, routers=[ledger.router("A", topic, kind)]) as a:
            # Pulsar's failover makes the member whose name sorts first active: the newcomer.
            monkeypatch.setattr(membership.socket, "gethostname", lambda: "z-first")
            await tg.start(lambda task_status: a.run(handle_signals=False, task_status=task_status))
            await eventually(lambda: ledger.events, what="A to start handling")
            monkeypatch.setattr(membership.socket, "gethostname", lambda: "a-second")
            b = EventBus(settings, routers=[ledger.router("B", topic, kind)])
            await b.start()
            await tg.start(lambda task_status: b.run(handle_signals=False, task_status=task_status))  # joins mid-flight
            await eventually(lambda: len(ledger.events) >= 40, what="a part of the messages")
            a.stop()  # leaves mid-flight: drains, and its unstarted messages go to B
        await eventually(lambda: {n for _, w, _, n in ledger.events if w == "end"} >= {n for _, n in published},
                         timeout=60, what="every message handled")
        b.stop()
    await b.close()
    starts = collections.Counter(n for _, w, _, n in ledger.events if w == "start")
    print(f"{kind}/{partitions}: {sum(starts.values())} starts for {len(published)} messages, "
          f"{sum(c > 1 for c in starts.values())} handled twice")
    assert ledger.overlaps == 0, "a key ran in two places at once"
    assert ledger.reorders(published) == 0, "a key's message started before an earlier one"
