"""Building a service on the bus: lifespans and injected dependencies, on a real broker.

No `from __future__ import annotations`: the providers are local to the tests, and `Annotated[..., Depends(p)]`
must be read where they are in scope.
"""

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
import pytest
from pydantic import BaseModel

from eventbus import (
    CallNext,
    Depends,
    EventBus,
    Message,
    Outgoing,
    PublishNext,
    Reject,
    RequestFailed,
    RequestTimeout,
    Router,
    Settings,
    StartupFailed,
)
from eventbus.testing import Harness, call_handler

from .conftest import eventually, raw_client, read_messages, running
from .test_observability import _get
from .test_worker_process import cli


class Database:
    """A resource with a life: open, used, closed."""

    def __init__(self, log: list[str], name: str = "db") -> None:
        self.log, self.name, self.open = log, name, False

    def use(self, what: object) -> None:
        if not self.open:
            raise RuntimeError(f"{self.name} is not open")
        self.log.append(f"{self.name} used by {what}")


async def test_lifespans_enter_before_consuming_in_order_and_exit_after_the_drain_in_reverse(
    settings: Settings, topic: str
) -> None:
    log: list[str] = []
    first, second = Router(), Router()
    bus: EventBus

    def lifespan(name: str):  # type: ignore[no-untyped-def]
        @asynccontextmanager
        async def life(given: EventBus) -> AsyncIterator[None]:
            assert given is bus
            assert all(r.state != "consuming" for r in given.running), "entered before any subscription consumes"
            log.append(f"enter {name}")
            yield
            drained = all(r.state == "stopped" and r.in_flight == 0 for r in given.running)  # the retry topic's too
            log.append(f"exit {name}: {'drained' if drained else 'NOT drained'}")

        return life

    first.lifespan(lifespan("first"))
    second.lifespan(lifespan("second"))
    started, release = anyio.Event(), anyio.Event()

    @first.subscribe(topic, "g", initial_position="earliest")
    async def slow(n: int) -> None:
        log.append(f"handling {n}")
        started.set()
        await release.wait()
        log.append(f"handled {n}")

    bus = EventBus(settings, routers=[first, second], lifespan=lifespan("bus"))
    async with bus:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            await bus.publish(topic, 1)
            await started.wait()
            bus.stop()  # the drain begins with the handler running
            release.set()
    assert log == [
        "enter bus", "enter first", "enter second", "handling 1", "handled 1",
        "exit second: drained", "exit first: drained", "exit bus: drained",
    ]


async def test_a_handler_in_the_drain_still_has_what_a_background_task_holds(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The trial that dead-lettered an order on SIGTERM: the resource was closed by a background task's `finally`."""
    caplog.set_level(logging.INFO, logger="eventbus")
    log: list[str] = []
    db = Database(log)
    router = Router()
    started, release = anyio.Event(), anyio.Event()

    @router.run_in_background
    async def hold_database(bus: EventBus) -> None:
        db.open = True
        try:
            await anyio.sleep_forever()
        finally:
            db.open = False
            log.append("db closed")

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=0)
    async def handle(n: int) -> None:
        started.set()
        await release.wait()
        db.use(n)

    async with Harness(settings, [router]) as app:
        await app.publish(topic, 1)
        await started.wait()
        app.bus.stop()
        # The drain has begun (the background task used to be cancelled just before this line is logged).
        await eventually(lambda: "stopping: draining" in caplog.text, what="the drain")
        release.set()
        await app.wait_handled(topic=topic)
    assert log == ["db used by 1", "db closed"]
    assert [h.outcome for h in app.handled] == ["ok"] and app.dead_letters == []


async def test_a_lifespan_that_raises_stops_the_worker_before_anything_is_consumed(
    settings: Settings, topic: str
) -> None:
    handled: list[int] = []
    broken = Router()

    @broken.lifespan
    @asynccontextmanager
    async def no_database(bus: EventBus) -> AsyncIterator[None]:
        raise ConnectionRefusedError("database at 10.0.0.9:5432 refused")
        yield

    broken.subscribe(topic, "g", initial_position="earliest")(handled.append)
    async with EventBus(settings, routers=[broken]) as bus:
        await bus.publish(topic, 1)
        with pytest.raises(StartupFailed) as failed:
            await bus.run(handle_signals=False)
    assert "lifespan" in str(failed.value) and "no_database" in str(failed.value)
    assert "ConnectionRefusedError: database at 10.0.0.9:5432 refused" in str(failed.value)
    assert 'raise ConnectionRefusedError("database at 10.0.0.9:5432 refused")' in failed.value.details
    assert isinstance(failed.value.__cause__, ConnectionRefusedError)
    assert handled == []

    fixed = Router()
    fixed.subscribe(topic, "g", initial_position="earliest")(handled.append)
    async with EventBus(settings, routers=[fixed]) as bus, running(bus):
        await eventually(lambda: handled == [1], what="the message nobody consumed")


async def test_readyz_stays_down_until_every_lifespan_is_entered(settings: Settings, topic: str) -> None:
    router = Router()
    entered, release = anyio.Event(), anyio.Event()

    @router.lifespan
    @asynccontextmanager
    async def slow_start(bus: EventBus) -> AsyncIterator[None]:
        entered.set()
        await release.wait()
        yield

    router.subscribe(topic, "g")(lambda n: None)
    observed = settings.model_copy(update={"metrics_port": 0})
    async with EventBus(observed, routers=[router]) as bus, anyio.create_task_group() as tg:
        tg.start_soon(lambda: bus.run(handle_signals=False))
        await entered.wait()
        await eventually(lambda: bus.probe_port, what="the probe port")
        port = bus.probe_port
        assert port is not None
        assert (await anyio.to_thread.run_sync(_get, port, "/readyz"))[0] == 503
        release.set()
        with anyio.fail_after(20):
            while (await anyio.to_thread.run_sync(_get, port, "/readyz"))[0] != 200:
                await anyio.sleep(0.05)
        bus.stop()


def test_a_lifespan_must_be_an_async_context_manager_function() -> None:
    router = Router()

    async def not_a_context_manager(bus: EventBus) -> None: ...

    with pytest.raises(TypeError, match="write `@asynccontextmanager async def lifespan"):
        router.lifespan(not_a_context_manager)

    async def generator(bus: EventBus) -> AsyncIterator[None]:  # no decorator: taken as one
        yield

    router.lifespan(generator)
    assert len(router.lifespans) == 1


# -- dependencies -----------------------------------------------------------------------


async def test_dependencies_app_scoped_once_per_worker_message_scoped_per_attempt(settings: Settings, topic: str) -> None:
    log: list[str] = []
    loop_thread = threading.get_ident()

    async def database(bus: EventBus) -> AsyncIterator[Database]:
        db = Database(log)
        db.open = True
        log.append("db opened")
        yield db
        db.open = False
        log.append("db closed")

    def settings_file() -> dict[str, str]:  # a plain function: it may block, so it runs in a thread
        log.append(f"settings read in {'a thread' if threading.get_ident() != loop_thread else 'the loop'}")
        return {"currency": "EUR"}

    async def session(
        db: Annotated[Database, Depends(database, scope="app")], message: Message
    ) -> AsyncIterator[str]:
        log.append(f"session for {message.key} attempt {message.attempt}")
        try:
            yield f"session-{message.key}"
        except ValueError as exc:
            log.append(f"session rolled back: {exc}")
            raise
        finally:
            log.append(f"session for {message.key} closed")

    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=1, retry_backoff=0)
    async def charge(
        order: dict,
        s: Annotated[str, Depends(session)],
        db: Annotated[Database, Depends(database, scope="app")],
        config: Annotated[dict[str, str], Depends(settings_file, scope="app")],
    ) -> None:
        db.use(f"{s} in {config['currency']}")
        if order.get("fail"):
            raise ValueError("card declined")

    async with Harness(settings, [router]) as app:
        await app.publish(topic, {"id": 1}, key="o-1")
        await app.wait_handled(topic=topic)
        await app.publish(topic, {"id": 2, "fail": True}, key="o-2")
        await app.wait_handled(topic=topic, outcome="dead_lettered")
        await eventually(lambda: app.dead_letters, what="the dead letter")
    assert log == [
        "db opened", "settings read in a thread",
        "session for o-1 attempt 1", "db used by session-o-1 in EUR", "session for o-1 closed",
        "session for o-2 attempt 1", "db used by session-o-2 in EUR", "session rolled back: card declined",
        "session for o-2 closed",
        "session for o-2 attempt 2", "db used by session-o-2 in EUR", "session rolled back: card declined",
        "session for o-2 closed",
        "db closed",
    ]
    [dead] = app.dead_letters
    assert (dead.reason, dead.error_type, dead.error) == ("handler-failed", "ValueError", "card declined")


async def test_a_provider_that_raises_fails_the_attempt_and_a_cleanup_cannot_swallow_a_failure(
    settings: Settings, topic: str
) -> None:
    log: list[str] = []

    def flaky() -> str:
        raise ConnectionError("pool exhausted")

    def forgiving() -> Iterator[str]:  # a sync generator: entered and left in a thread
        try:
            yield "lenient"
        except Exception as exc:
            log.append(f"swallowed {exc}")  # and does not raise again: the attempt must fail all the same

    router = Router()

    @router.subscribe(topic, "a", initial_position="earliest", max_retries=0)
    async def needs_pool(n: int, pool: Annotated[str, Depends(flaky)]) -> None:
        log.append("never")

    @router.subscribe(topic, "b", initial_position="earliest", max_retries=0)
    async def fails(n: int, lenient: Annotated[str, Depends(forgiving)]) -> None:
        raise KeyError("missing sku")

    async with Harness(settings, [router]) as app:
        await app.publish(topic, 1)
        await app.wait_handled(2, topic=topic, outcome="dead_lettered")
        await eventually(lambda: len(app.dead_letters) == 2, what="both dead letters")
    assert log == ["swallowed 'missing sku'"]
    errors = {d.group: (d.error_type, d.error) for d in app.dead_letters}
    assert errors == {"a": ("ConnectionError", "pool exhausted"), "b": ("KeyError", "'missing sku'")}


async def test_an_app_scoped_provider_that_raises_stops_the_worker_before_consuming(settings: Settings, topic: str) -> None:
    async def database() -> Database:
        raise OSError("disk full")

    router = Router()

    @router.subscribe(topic, "g")
    async def handle(n: int, db: Annotated[Database, Depends(database, scope="app")]) -> None: ...

    async with EventBus(settings, routers=[router]) as bus:
        with pytest.raises(StartupFailed, match="app-scoped dependency raised on entry.*OSError: disk full"):
            await bus.run(handle_signals=False)


async def test_dependency_overrides_replace_providers_in_the_worker_and_in_call_handler(
    settings: Settings, topic: str
) -> None:
    def real_db() -> str:
        raise AssertionError("the real database is never touched in tests")

    async def fake_db() -> str:
        return "fake"

    seen: list[str] = []
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def handle(n: int, db: Annotated[str, Depends(real_db, scope="app")]) -> None:
        seen.append(db)

    async with Harness(settings, [router], dependency_overrides={real_db: fake_db}) as app:
        await app.publish(topic, 1)
        await app.wait_handled(topic=topic)
    result = await call_handler(handle, 2, routers=[router], dependencies={real_db: fake_db})
    assert result.ok and seen == ["fake", "fake"]
    failed = await call_handler(handle, 3, routers=[router])
    assert failed.outcome == "retry" and "real database" in str(failed.error)


def test_a_dependency_graph_that_cannot_be_made_fails_at_registration() -> None:
    router = Router()

    def needs_nothing_given(url) -> str:  # type: ignore[no-untyped-def]
        return url  # type: ignore[no-any-return]

    with pytest.raises(TypeError, match=r"on .*bad: parameter 'db': .*needs_nothing_given: its parameter 'url' has nothing"):

        @router.subscribe("orders", "g")
        async def bad(n: int, db: Annotated[str, Depends(needs_nothing_given)]) -> None: ...

    def a(b: Annotated[str, Depends(lambda: "")]) -> str:
        return b

    def cyclic_one(x: Annotated[str, Depends(lambda: "")]) -> str:
        return x

    def cyclic_two(y: str = Depends(cyclic_one)) -> str:
        return y

    cyclic_one.__annotations__["x"] = Annotated[str, Depends(cyclic_two)]
    with pytest.raises(TypeError, match=r"parameter 'v' needs a cycle of providers, .*cyclic_two -> .*cyclic_one -> .*cyclic_two"):

        @router.subscribe("orders", "h")
        async def loops(n: int, v: Annotated[str, Depends(cyclic_two)]) -> None: ...

    async def per_message(m: Message) -> str:
        return m.key or ""

    async def app_wide(k: Annotated[str, Depends(per_message)]) -> str:
        return k

    with pytest.raises(TypeError, match="app-scoped but needs .*per_message, made per message"):

        @router.subscribe("orders", "i")
        async def mixed(n: int, v: Annotated[str, Depends(app_wide, scope="app")]) -> None: ...

    with pytest.raises(ValueError, match="scope is 'message'"):
        Depends(a, scope="worker")  # type: ignore[arg-type]
    assert router.subscriptions == []


def test_eventbus_run_exits_1_with_the_lifespans_traceback_then_one_line(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "shop.py").write_text(
        "import os\nfrom contextlib import asynccontextmanager\nfrom eventbus import Router\n"
        "router = Router()\n"
        "@router.lifespan\n@asynccontextmanager\nasync def database(bus):\n"
        "    raise ConnectionRefusedError('database refused')\n    yield\n"
        "router.subscribe(os.environ['EB_TOPIC'], 'g')(print)\n"
    )
    env = {**subprocess_env, "EB_TOPIC": topic, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    result = cli(env, "run", "shop:router")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert f'File "{tmp_path / "shop.py"}", line 8, in database' in result.stderr
    assert lines[-1] == (
        "error: lifespan shop.database raised on entry, so the worker stopped before consuming: "
        "ConnectionRefusedError: database refused"
    )


# -- middleware -------------------------------------------------------------------------


class Tagging:
    """Both sides: around each attempt, and a property on every publish (appended to a chain, to see the order)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def __call__(self, message: Message, call_next: CallNext) -> object:
        self.log.append(f"{self.name} before {message.key}#{message.attempt}")
        try:
            return await call_next(message)
        finally:
            self.log.append(f"{self.name} after")

    async def on_publish(self, outgoing: Outgoing, call_next: PublishNext) -> object:
        chain = outgoing.properties.get("chain")
        return await call_next(outgoing.with_properties(chain=f"{chain}>{self.name}" if chain else self.name))


def _stored_chains(settings: Settings, url: str, topic: str) -> list[tuple[bytes, str | None]]:
    client = raw_client(url, settings.jwt())
    try:
        return [(m.data(), m.properties().get("chain")) for m in read_messages(client, settings.topic(topic))]
    finally:
        client.close()


async def test_middleware_wraps_every_attempt_bus_first_and_tags_every_publish(settings: Settings, topic: str) -> None:
    log: list[str] = []
    router = Router(middleware=[Tagging("router-1", log), Tagging("router-2", log)])
    out = f"{topic}-out"

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=1, retry_backoff=0)
    async def forward(n: int, message: Message, bus: EventBus) -> None:
        log.append(f"handler {n}")
        if message.attempt == 1:
            raise ValueError("first try fails")
        await bus.publish(out, n, key="k")

    async with EventBus(settings, routers=[router], middleware=[Tagging("bus", log)]) as bus, running(bus):
        await bus.publish(topic, 1, key="k")
        await eventually(lambda: log.count("bus after") == 2, what="the second attempt's end")
        await bus.publish_batch(out, [2, 3], key="k")
        url = bus.url
    assert log == [
        "bus before k#1", "router-1 before k#1", "router-2 before k#1", "handler 1",
        "router-2 after", "router-1 after", "bus after",
        "bus before k#2", "router-1 before k#2", "router-2 before k#2", "handler 1",
        "router-2 after", "router-1 after", "bus after",
    ]
    every = "bus>router-1>router-2"
    assert _stored_chains(settings, url, topic) == [(b"1", every)]
    assert _stored_chains(settings, url, out) == [(b"1", every), (b"2", every), (b"3", every)]


async def test_a_middleware_that_raises_fails_the_attempt_as_a_handler_would(settings: Settings, topic: str) -> None:
    called: list[int] = []

    async def gatekeeper(message: Message, call_next: CallNext) -> object:
        if message.properties.get("tenant") is None:
            raise Reject("no tenant")
        if message.properties["tenant"] == "flaky" and message.attempt == 1:
            raise TimeoutError("auth service slow")
        return await call_next(message)

    router = Router(middleware=[gatekeeper])
    router.subscribe(topic, "g", initial_position="earliest", max_retries=2, retry_backoff=0)(called.append)
    async with Harness(settings, [router]) as app:
        await app.publish(topic, 1)
        await app.publish(topic, 2, properties={"tenant": "flaky"})
        await app.publish(topic, 3, properties={"tenant": "acme"})
        await app.wait_handled(2, topic=topic)
        await eventually(lambda: app.dead_letters, what="the dead letter")
    [dead] = app.dead_letters
    assert (dead.reason, dead.error, dead.attempts, dead.data) == ("rejected", "no tenant", 1, b"1")
    assert sorted(called) == [2, 3]
    assert [h.outcome for h in app.handled if h.payload == 2] == ["retried", "ok"]


async def test_call_handler_runs_the_routers_middleware() -> None:
    log: list[str] = []
    router = Router(middleware=[Tagging("mw", log)])

    @router.subscribe("orders", "g")
    async def handle(n: int) -> None:
        log.append(f"handler {n}")

    result = await call_handler(handle, 5, routers=[router], key="o-5")
    assert result.ok and log == ["mw before o-5#1", "handler 5", "mw after"]


def test_middleware_that_is_neither_side_is_refused_at_construction() -> None:
    def sync_middleware(message: Message, call_next: CallNext) -> None: ...

    with pytest.raises(TypeError, match=r"Router\(middleware=...\): middleware .*sync_middleware.* is neither"):
        Router(middleware=[sync_middleware])
    with pytest.raises(TypeError, match="takes a list of middleware"):
        EventBus(middleware=Tagging("x", []))  # type: ignore[arg-type]


# -- return values ----------------------------------------------------------------------


class Invoice(BaseModel):
    order: int
    total: float


async def test_a_return_value_is_published_to_returns_to_keyed_as_its_message(settings: Settings, topic: str) -> None:
    router = Router()
    invoices = f"{topic}-invoices"

    @router.subscribe(topic, "billing", initial_position="earliest", returns_to=invoices)
    async def charge(order: dict) -> Invoice | None:
        return Invoice(order=order["id"], total=order["qty"] * 2.5) if order["qty"] else None

    async with Harness(settings, [router]) as app:
        for n, qty in enumerate([2, 0, 4]):
            await app.publish(topic, {"id": n, "qty": qty}, key=f"o-{n}")
        await app.wait_handled(3, topic=topic)
        await eventually(lambda: len(app.published_to(invoices)) == 2, what="two invoices")
        url = app.bus.url
    client = raw_client(url, settings.jwt())
    try:
        stored = [(m.partition_key(), m.data()) for m in read_messages(client, settings.topic(invoices))]
    finally:
        client.close()
    assert stored == [("o-0", b'{"order":0,"total":5.0}'), ("o-2", b'{"order":2,"total":10.0}')]
    result = await call_handler(charge, {"id": 9, "qty": 1}, routers=[router], key="o-9")
    assert result.returned == Invoice(order=9, total=2.5)
    assert [(p.topic.rsplit("/", 1)[1], p.key, p.payload) for p in result.published] == [(invoices, "o-9", result.returned)]


async def test_the_input_is_acknowledged_only_after_its_output_is_stored(settings: Settings, topic: str) -> None:
    """A failed output publish fails the attempt: the input is retried (its output may be duplicated, never lost)."""
    router = Router()
    out = f"{topic}-out"
    attempts: list[int] = []

    @router.subscribe(topic, "g", initial_position="earliest", returns_to=out, max_retries=3, retry_backoff=0)
    async def double(n: int) -> object:
        attempts.append(n)
        return {"n": n * 2} if len(attempts) > 1 else {"n": object()}  # the first output cannot be encoded

    async with Harness(settings, [router]) as app:
        await app.publish(topic, 21)
        await app.wait_handled(topic=topic)
        await eventually(lambda: app.published_to(out), what="the output")
    assert attempts == [21, 21]
    assert [h.outcome for h in app.handled] == ["retried", "ok"]
    assert "cannot encode payload of type dict" in str(app.handled[0].error)
    assert [p.payload for p in app.published_to(out)] == [{"n": 42}]


async def test_a_value_returned_to_nowhere_is_logged_once_per_handler(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def compute(n: int) -> int:
        return n + 1

    async with Harness(settings, [router]) as app:
        for n in range(3):
            await app.publish(topic, n)
        await app.wait_handled(3, topic=topic)
    lines = [r.getMessage() for r in caplog.records if "goes nowhere" in r.getMessage()]
    assert len(lines) == 1 and "compute returned a int" in lines[0] and "returns_to=" in lines[0]


# -- request/reply ----------------------------------------------------------------------


class Quote(BaseModel):
    sku: str
    price: float


async def test_request_returns_the_handlers_reply_decoded(settings: Settings, topic: str) -> None:
    router = Router()

    @router.subscribe(topic, "pricing", initial_position="earliest")
    async def price(basket: dict):  # type: ignore[no-untyped-def]  # unannotated: it may return something
        if basket["sku"] == "free":
            return None
        return Quote(sku=basket["sku"], price=9.5 * basket["qty"])

    async with Harness(settings, [router]) as responder, EventBus(settings, routers=[]) as requester:
        quote = await requester.request(topic, {"sku": "tea", "qty": 2}, response_type=Quote, timeout=20)
        assert quote == Quote(sku="tea", price=19.0)
        raw = await requester.request(topic, {"sku": "tea", "qty": 1}, key="tea", timeout=20)
        assert raw == {"sku": "tea", "price": 9.5}
        assert await requester.request(topic, {"sku": "free", "qty": 1}, timeout=20) is None
        together = await asyncio.gather(
            *(requester.request(topic, {"sku": f"s{n}", "qty": n}, response_type=Quote, timeout=20) for n in range(20))
        )
        assert [q.price for q in together] == [9.5 * n for n in range(20)]
        assert requester.late_replies == 0
    assert len([h for h in responder.handled if h.outcome == "ok"]) == 23


async def test_a_request_its_handler_gave_up_on_raises_request_failed(settings: Settings, topic: str) -> None:
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=1, retry_backoff=0)
    async def answer(question: dict) -> str:
        if question["q"] == "reject":
            raise Reject("not a question")
        raise LookupError(f"no answer to {question['q']}")

    async with Harness(settings, [router]), EventBus(settings, routers=[]) as requester:
        with pytest.raises(RequestFailed) as failed:
            await requester.request(topic, {"q": "meaning"}, timeout=20)
        assert (failed.value.reason, failed.value.error_type, failed.value.error) == (
            "handler-failed", "LookupError", "no answer to meaning"
        )
        with pytest.raises(RequestFailed, match=r"failed \(rejected\): Reject: not a question"):
            await requester.request(topic, {"q": "reject"}, timeout=20)


async def test_a_late_reply_is_dropped_and_counted_and_a_gone_requester_stalls_nobody(
    settings: Settings, topic: str
) -> None:
    answered: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def answer(n: int) -> int:
        answered.append(n)
        return n * 10

    async with EventBus(settings, routers=[]) as requester:
        with pytest.raises(RequestTimeout, match="no reply from .* within 0.5s"):
            await requester.request(topic, 1, timeout=0.5)  # nobody answers yet
        async with Harness(settings, [router]) as responder:
            await responder.wait_handled(topic=topic, timeout=20)  # the stored request is handled now
            await eventually(lambda: requester.late_replies == 1, what="the late reply, dropped")
            assert await requester.request(topic, 2, timeout=20) == 20
    async with EventBus(settings, routers=[]) as gone:
        with pytest.raises(RequestTimeout):
            await gone.request(topic, 3, timeout=0.5)
    # Its requester is closed: the reply goes out all the same and the responder carries on.
    async with Harness(settings, [router]) as responder:
        await responder.wait_handled(topic=topic, timeout=20)
        await responder.publish(topic, 4)
        await responder.wait_handled(2, topic=topic, timeout=20)
    assert answered == [1, 2, 3, 4]



async def test_a_worker_killed_between_the_output_and_the_ack_duplicates_the_output_never_loses_it(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL after the broker stored the output and before the input was acknowledged: the input comes back."""
    from .test_worker_process import Worker

    (tmp_path / "doubler.py").write_text(
        "import os, signal\nfrom pathlib import Path\nfrom eventbus import Router\n"
        "MARK = Path(os.environ['EB_MARK'])\n"
        "class KillOnce:\n"
        "    async def on_publish(self, outgoing, call_next):\n"
        "        stored = await call_next(outgoing)\n"
        "        if not MARK.exists():\n"
        "            MARK.write_text('killed')\n"
        "            os.kill(os.getpid(), signal.SIGKILL)  # the output is stored; the input is not acknowledged\n"
        "        return stored\n"
        "router = Router(middleware=[KillOnce()])\n"
        "@router.subscribe(os.environ['EB_TOPIC'], 'g', initial_position='earliest', returns_to=os.environ['EB_OUT'])\n"
        "async def double(n: int) -> int:\n"
        "    return 2 * n\n"
    )
    out = f"{topic}-out"
    env = {**subprocess_env, "EB_TOPIC": topic, "EB_OUT": out, "EB_MARK": str(tmp_path / "mark"),
           "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    async with EventBus(settings, routers=[]) as bus:
        await bus.publish(topic, 21)
        first = Worker(env, tmp_path / "first.log", "doubler:router")
        assert await first.wait_exit(60) == -9, first.text()
        second = Worker(env, tmp_path / "second.log", "doubler:router")
        try:
            await second.wait_subscribed()
            client = raw_client(bus.url or settings.url, settings.jwt())
            try:
                await eventually(lambda: len(read_messages(client, settings.topic(out))) == 2, timeout=60, what="the output again")
                stored = [m.data() for m in read_messages(client, settings.topic(out))]
            finally:
                client.close()
        finally:
            second.kill()
    assert stored == [b"42", b"42"], "stored before the kill, and again by the worker the input came back to"


async def test_a_request_survives_its_responder_being_killed(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """The responder dies with the request in hand; its replacement handles it and the reply still comes."""
    from .test_worker_process import Worker

    (tmp_path / "pricing.py").write_text(
        "import os, signal\nfrom pathlib import Path\nfrom eventbus import Router\n"
        "MARK = Path(os.environ['EB_MARK'])\n"
        "async def die_once(message, call_next):\n"
        "    if not MARK.exists():\n"
        "        MARK.write_text('killed')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return await call_next(message)\n"
        "router = Router(middleware=[die_once])\n"
        "@router.subscribe(os.environ['EB_TOPIC'], 'pricing', initial_position='earliest')\n"
        "async def price(sku: str) -> dict:\n"
        "    return {'sku': sku, 'price': 4.5, 'pid': os.getpid()}\n"
    )
    env = {**subprocess_env, "EB_TOPIC": topic, "EB_MARK": str(tmp_path / "mark"),
           "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    first = Worker(env, tmp_path / "first.log", "pricing:router")
    second: Worker | None = None
    try:
        await first.wait_subscribed()
        async with EventBus(settings, routers=[]) as requester, anyio.create_task_group() as tg:
            replies: list[dict] = []

            async def ask() -> None:
                replies.append(await requester.request(topic, "tea", timeout=90))

            tg.start_soon(ask)
            assert await first.wait_exit(60) == -9, first.text()
            second = Worker(env, tmp_path / "second.log", "pricing:router")
        assert replies[0]["sku"] == "tea" and replies[0]["pid"] == second.proc.pid
    finally:
        first.kill()
        if second is not None:
            second.kill()
