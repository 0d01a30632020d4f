"""eventbus.testing: the harness, its fixtures, call_handler, and declared publishers, checked against the broker."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest
from pydantic import BaseModel

from eventbus import EventBus, Message, Reject, Router, Settings
from eventbus.consuming.attempts import HandlerTimeout
from eventbus.testing import Harness, RecordingPublisher, call_handler

from .conftest import id_of, read_stored


class Order(BaseModel):
    id: str
    qty: int


class Invoice(BaseModel):
    order: str


def shop() -> Router:
    """Orders are charged (an invoice each); qty 0 is rejected; qty < 0 fails every time."""
    router = Router()
    router.publisher("invoices", Invoice)

    @router.subscribe("orders", "billing", max_retries=1, retry_backoff=0.01)
    async def charge(order: Order, bus: EventBus) -> None:
        if order.qty == 0:
            raise Reject("nothing to charge")
        if order.qty < 0:
            raise ValueError(f"negative quantity {order.qty}")
        await bus.publish("invoices", Invoice(order=order.id), key=order.id)

    return router


@pytest.fixture
def eventbus_routers() -> list[Router]:
    return [shop()]


async def test_what_the_harness_records_is_what_the_broker_stored(settings: Settings, topic: str) -> None:
    router = Router()

    @router.subscribe(topic, "g", max_retries=1, retry_backoff=0.01)
    async def handle(order: Order, bus: EventBus) -> None:
        if order.qty < 0:
            raise ValueError("negative")
        await bus.publish(f"{topic}.out", {"order": order.id}, key=order.id)

    async with Harness(settings, [router]) as app:
        for i in range(5):
            await app.publish(topic, Order(id=f"o{i}", qty=1 - 2 * (i == 3)), key=f"o{i}", properties={"n": str(i)})
        await app.wait_handled(4, topic=topic)
        [dead] = await app.wait_dead_lettered(topic=topic)
        await app.wait_published(4, topic=f"{topic}.out")
        url = app.bus.url

    stored = read_stored(url, settings.jwt(), app.topic(topic))
    sent = app.published_to(topic)
    assert len(sent) == 5 and {p.data: [id_of(p.message_id)] for p in sent} == stored
    assert [p.properties["n"] for p in sent] == ["0", "1", "2", "3", "4"]
    out = read_stored(url, settings.jwt(), app.topic(f"{topic}.out"))
    assert {p.data: [id_of(p.message_id)] for p in app.published_to(f"{topic}.out")} == out
    dlq = read_stored(url, settings.jwt(), dead.dead_letter_topic)
    assert list(dlq) == [dead.data] == [sent[3].data]
    assert (dead.reason, dead.error_type, dead.error, dead.attempts, dead.key) == (
        "handler-failed", "ValueError", "negative", 2, "o3",
    )
    outcomes = [(h.payload.id, h.outcome) for h in app.handled if h.payload.id == "o3"]
    assert outcomes == [("o3", "retried"), ("o3", "dead_lettered")]


async def test_each_test_sees_only_its_own_messages(eventbus_settings: Settings, eventbus_routers: list[Router]) -> None:
    other = eventbus_settings.model_copy(update={"namespace": eventbus_settings.namespace + "-other"})
    async with Harness(eventbus_settings, eventbus_routers) as mine, Harness(other, [shop()]) as theirs:
        await theirs.publish("orders", Order(id="theirs", qty=1), key="theirs")
        await mine.publish("orders", Order(id="mine", qty=1), key="mine")
        await mine.wait_handled(topic="orders")
        await theirs.wait_handled(topic="orders")
    assert [h.payload.id for h in mine.handled] == ["mine"]
    assert [h.payload.id for h in theirs.handled] == ["theirs"]
    assert mine.topic("orders") != theirs.topic("orders")


async def test_the_fixture_runs_the_app_and_records_publishes_rejections_and_dead_letters(eventbus_app: Harness) -> None:
    await eventbus_app.publish("orders", Order(id="a", qty=2), key="a")
    await eventbus_app.publish("orders", Order(id="b", qty=0), key="b")
    await eventbus_app.publish("orders", Order(id="c", qty=-1), key="c")

    [invoice] = await eventbus_app.wait_published(topic="invoices")
    assert (invoice.key, invoice.payload) == ("a", Invoice(order="a"))
    dead = await eventbus_app.wait_dead_lettered(2, topic="orders")
    assert sorted((d.key, d.reason, d.error) for d in dead) == [
        ("b", "rejected", "nothing to charge"),
        ("c", "handler-failed", "negative quantity -1"),
    ]


async def test_a_wait_that_times_out_fails_with_what_was_seen(eventbus_app: Harness) -> None:
    await eventbus_app.publish("orders", Order(id="a", qty=1), key="a")
    await eventbus_app.wait_handled()
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        await eventbus_app.wait_handled(2, topic="orders", timeout=0.3)
    assert time.monotonic() - started < 2
    text = str(failure.value)
    assert "waited 0.3s for 2 handled messages (topic='orders', outcome='ok'), found 1; seen:" in text
    assert "ok              persistent://public/test-" in text and "payload=Order(id='a', qty=1)" in text


async def test_a_declared_publisher_refuses_another_payload_type_before_sending(eventbus_app: Harness) -> None:
    with pytest.raises(TypeError, match=r"declares Invoice payloads there \(Router.publisher\), not dict"):
        await eventbus_app.publish("invoices", {"order": "x"})
    with pytest.raises(TypeError, match=r"payload #1: .*not Order"):
        await eventbus_app.bus.publish_batch("invoices", [Invoice(order="x"), Order(id="x", qty=1)])
    await eventbus_app.publish("invoices", Invoice(order="y"))
    stored = read_stored(eventbus_app.bus.url, None, eventbus_app.topic("invoices"))
    assert list(stored) == [b'{"order":"y"}']


def test_a_worker_started_and_stopped_in_different_tasks_has_no_cancel_scope_error(
    eventbus_settings: Settings, eventbus_routers: list[Router]
) -> None:
    """What a pytest-asyncio async-generator fixture does: set-up and teardown run in two tasks."""

    async def naive() -> None:
        bus = EventBus(eventbus_settings, eventbus_routers)
        holder: dict[str, object] = {}

        async def set_up() -> None:
            await bus.start()
            group = anyio.create_task_group()
            await group.__aenter__()
            await group.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            holder["group"] = group

        async def tear_down() -> None:
            bus.stop()
            await holder["group"].__aexit__(None, None, None)  # type: ignore[attr-defined]

        await asyncio.create_task(set_up())
        try:
            await asyncio.create_task(tear_down())
        finally:
            await bus.close()

    async def harness() -> list[str]:
        app = Harness(eventbus_settings, eventbus_routers)
        await asyncio.create_task(app.__aenter__())
        await app.publish("orders", Order(id="a", qty=1), key="a")
        await app.wait_published(topic="invoices")
        await asyncio.create_task(app.__aexit__(None, None, None))
        return [h.outcome for h in app.handled]

    with pytest.raises(RuntimeError, match="cancel scope in a different task"):
        asyncio.run(naive())
    assert asyncio.run(harness()) == ["ok"]


def test_the_plugin_works_in_a_fresh_project_in_strict_mode_at_function_and_module_scope(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\neventbus_app = shop_app:router\n"
    )
    pytester.makepyfile(
        shop_app='''
from eventbus import EventBus, Router
router = Router()

@router.subscribe("orders", "billing")
async def charge(order: dict, bus: EventBus) -> None:
    await bus.publish("invoices", {"order": order["id"]})
''',
        test_shop='''
import pytest, pytest_asyncio
from eventbus.testing import Harness

@pytest.mark.asyncio
async def test_function_scope(eventbus_app):
    await eventbus_app.publish("orders", {"id": "o-1"})
    [invoice] = await eventbus_app.wait_published(topic="invoices")
    assert invoice.payload == {"order": "o-1"}

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop(eventbus_broker, tmp_path_factory):
    from eventbus import Settings
    import shop_app
    settings = Settings(_env_file=None, url="", data_dir=eventbus_broker.data_dir, namespace="module-scope")
    async with Harness(settings, [shop_app.router]) as app:
        yield app

@pytest.mark.asyncio(loop_scope="module")
async def test_module_scope_first(shop):
    await shop.publish("orders", {"id": "m-1"})
    await shop.wait_published(topic="invoices")

@pytest.mark.asyncio(loop_scope="module")
async def test_module_scope_second(shop):
    await shop.publish("orders", {"id": "m-2"})
    invoices = await shop.wait_published(2, topic="invoices")
    assert [i.payload["order"] for i in invoices] == ["m-1", "m-2"]
''',
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


# -- call_handler: no broker -------------------------------------------------------


async def test_call_handler_injects_the_message_and_the_bus_and_runs_sync_handlers_in_a_thread() -> None:
    router = Router()
    seen: list[tuple[Message, str]] = []

    @router.subscribe("orders", "audit", max_retries=2)
    def audit(order: Order, msg: Message, bus: EventBus) -> None:
        seen.append((msg, threading.current_thread().name))
        anyio.from_thread.run(bus.publish, "audited", {"id": order.id})

    result = await call_handler(
        audit, Order(id="o-1", qty=1), routers=[router], key="o-1", properties={"p": "v"}, attempt=2
    )
    assert result.ok and result.error is None
    [(msg, thread)] = seen
    assert thread != threading.current_thread().name
    assert (msg.topic, msg.key, msg.properties, msg.attempt, msg.data) == (
        "persistent://public/default/orders", "o-1", {"p": "v"}, 2, b'{"id":"o-1","qty":1}',
    )
    assert [(p.topic, p.payload) for p in result.published] == [("persistent://public/default/audited", {"id": "o-1"})]


async def test_call_handler_says_what_the_worker_would_do_after_a_failure() -> None:
    router = Router()

    class Permanent(Exception):
        pass

    @router.subscribe("orders", "billing", max_retries=2, retry_backoff=0.5, timeout=0.05, reject_on=(Permanent,))
    async def charge(order: Order) -> None:
        if order.id == "reject":
            raise Reject("no")
        if order.id == "permanent":
            raise Permanent("bad")
        if order.id == "interrupt":
            raise KeyboardInterrupt
        if order.id == "hang":
            await asyncio.sleep(10)
        raise ValueError("down")

    async def verdict(order_id: str, attempt: int = 1) -> tuple[str, str | None, str, float | None]:
        r = await call_handler(charge, Order(id=order_id, qty=1), routers=[router], attempt=attempt)
        return r.outcome, r.reason, type(r.error).__name__, r.retry_in

    assert await verdict("fail") == ("retry", None, "ValueError", 0.5)
    assert await verdict("fail", attempt=2) == ("retry", None, "ValueError", 1.0)
    assert await verdict("fail", attempt=3) == ("dead_letter", "handler-failed", "ValueError", None)
    assert await verdict("reject") == ("dead_letter", "rejected", "Reject", None)
    assert await verdict("permanent") == ("dead_letter", "rejected", "Permanent", None)
    assert await verdict("interrupt") == ("retry", None, "KeyboardInterrupt", 0.5)
    assert await verdict("hang") == ("retry", None, HandlerTimeout.__name__, 0.5)
    undecodable = await call_handler(charge, b"not json", routers=[router])
    assert (undecodable.outcome, undecodable.reason) == ("dead_letter", "undecodable")


async def test_call_handler_agrees_with_the_worker(eventbus_settings: Settings) -> None:
    """The worker's attempts, one by one, are what call_handler predicts for the same attempt numbers."""
    router = Router()

    @router.subscribe("orders", "billing", max_retries=2, retry_backoff=0.01, dead_letter=True)
    async def charge(order: Order, msg: Message) -> None:
        if order.qty < 0 or (order.qty == 0 and msg.attempt == 1):
            raise ValueError("down")

    async with Harness(eventbus_settings, [router]) as app:
        await app.publish("orders", Order(id="fails", qty=-1), key="fails")
        await app.publish("orders", Order(id="once", qty=0), key="once")
        await app.wait_dead_lettered()
        await app.wait_handled(where=lambda h: h.payload.id == "once")
    worker = {(h.payload.id, h.message.attempt if h.message else 0): h.outcome for h in app.handled}
    expected = {"ok": "ok", "retry": "retried", "dead_letter": "dead_lettered"}
    predicted = {}
    for (order_id, attempt) in worker:
        qty = -1 if order_id == "fails" else 0
        result = await call_handler(charge, Order(id=order_id, qty=qty), routers=[router], attempt=attempt)
        predicted[(order_id, attempt)] = expected[result.outcome]
    assert worker == predicted
    assert worker == {
        ("fails", 1): "retried", ("fails", 2): "retried", ("fails", 3): "dead_lettered",
        ("once", 1): "retried", ("once", 2): "ok",
    }


async def test_call_handler_names_what_is_wrong_with_its_target() -> None:
    router = Router()

    async def unregistered(order: dict) -> None: ...

    with pytest.raises(LookupError, match=r"unregistered is not a registered handler: decorate it with @subscribe"):
        await call_handler(unregistered, {}, routers=[router])

    async def both(order: dict) -> None: ...

    router.subscribe("a", "g")(both)
    router.subscribe("b", "g")(both)
    with pytest.raises(LookupError, match=r"handles several subscriptions, \('a', 'g'\), \('b', 'g'\): pass topic="):
        await call_handler(both, {}, routers=[router])
    assert (await call_handler(both, {}, routers=[router], topic="b")).ok

    recorder = RecordingPublisher()
    with pytest.raises(TypeError, match="cannot encode payload of type object"):
        await recorder.publish("x", object())


async def test_a_worker_started_later_takes_the_backlog_and_a_wait_fails_at_once_when_the_worker_stops(
    eventbus_settings: Settings,
) -> None:
    router = Router()

    @router.subscribe("orders", "billing", initial_position="earliest")
    async def charge(order: Order, bus: EventBus) -> None:
        if order.id == "last":
            bus.stop()

    async with Harness(eventbus_settings, [router], run=False) as app:
        await app.publish("orders", Order(id="early", qty=1))
        assert app.handled == []
        await app.start_worker()
        await app.wait_handled(where=lambda h: h.payload.id == "early")
        await app.publish("orders", Order(id="last", qty=1))
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"the worker stopped \(None\) while waiting for 5 handled messages"):
            await app.wait_handled(5, timeout=30)
        assert time.monotonic() - started < 10

