"""The service features under misuse, tried as an adversary: outcomes read back from the broker, never taken on trust."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest

from eventbus import Batch, BatchFailed, Depends, EventBus, Outgoing, PublishNext, Reject, RequestFailed, Router, Settings
from eventbus.testing import Harness, call_handler

from .conftest import eventually, raw_client, read_messages


def _stored(settings: Settings, url: str, topic: str) -> list[Any]:
    client = raw_client(url, settings.jwt())
    try:
        return read_messages(client, settings.topic(topic))
    finally:
        client.close()


# -- batch handlers: BatchFailed must say what failed ------------------------------------------------


@pytest.mark.parametrize(
    "failures, named",
    [
        ({0: None}, "each value must be the exception"),  # the handler said 0 failed, with no exception
        ({True: ValueError("b")}, "not indexes"),  # a bool is not an index (True == 1 would fail item 1)
        ({0: ValueError("a"), "1": ValueError("b")}, "not indexes"),  # mixed key types
        ({7: ValueError("past the end")}, "not indexes (0 to 2)"),
        ({}, "names no failed item"),
    ],
    ids=["none-value", "bool-key", "mixed-keys", "out-of-range", "empty"],
)
async def test_a_batch_failed_that_cannot_be_read_fails_the_whole_batch_and_acknowledges_none(
    settings: Settings, topic: str, failures: dict[Any, Any], named: str
) -> None:
    router = Router()

    @router.subscribe(
        topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(3, 1.0), max_retries=1,
        retry_backoff=0,
    )
    async def load(records: list[int]) -> None:
        raise BatchFailed(failures)

    async with EventBus(settings, routers=[]) as publisher:
        await publisher.publish_batch(topic, [0, 1, 2])
    async with Harness(settings, [router]) as app:
        await app.wait_dead_lettered(3, group="g", timeout=20)
        url = app.bus.url
        assert [h for h in app.handled if h.outcome == "ok"] == [], "nothing acknowledged as handled"
    stored = _stored(settings, url, f"{topic}-g-DLQ")
    assert sorted(m.data() for m in stored) == [b"0", b"1", b"2"]
    assert {m.properties()["eventbus-error-type"] for m in stored} == {"TypeError"}
    assert all(named in m.properties()["eventbus-error"] for m in stored), stored[0].properties()["eventbus-error"]


async def test_call_handler_judges_a_batch_item_by_item_as_the_worker_does() -> None:
    router = Router()

    @router.subscribe("records", "g", batch=Batch(10, 1.0), max_retries=2)
    async def load(records: list[int]) -> None:
        failures: dict[int, BaseException] = {i: Reject("odd") for i, r in enumerate(records) if r % 2}
        if records[0] == 10:
            failures[2] = ConnectionError("later")
        if records[0] == -1:
            raise BatchFailed({0: None})  # type: ignore[dict-item]
        raise BatchFailed(failures)

    result = await call_handler(load, [0, 1, 2], routers=[router])
    assert [i.outcome for i in result.items] == ["ok", "dead_letter", "ok"]
    assert (result.outcome, result.reason, str(result.error)) == ("dead_letter", "rejected", "odd")
    assert [i.message.data for i in result.items] == [b"0", b"1", b"2"]

    result = await call_handler(load, [10, 11, 12], routers=[router])
    assert [(i.outcome, i.reason) for i in result.items] == [("ok", None), ("dead_letter", "rejected"), ("retry", None)]

    result = await call_handler(load, [-1, 5], routers=[router])
    assert [i.outcome for i in result.items] == ["retry", "retry"] and result.outcome == "retry"
    assert isinstance(result.error, TypeError) and "each value must be the exception" in str(result.error)


# -- middleware: the chain's contract is kept, or the attempt fails naming the middleware --------------


class Dropping:
    """An on_publish that forgets to send."""

    async def on_publish(self, outgoing: Outgoing, call_next: PublishNext) -> object:
        return None


class KeepingTheId:
    """An on_publish that sends, but returns something else than the id."""

    async def on_publish(self, outgoing: Outgoing, call_next: PublishNext) -> object:
        await call_next(outgoing)
        return "sent"


@pytest.mark.parametrize(
    "middleware, named", [(Dropping(), "returned without calling call_next"), (KeepingTheId(), "not call_next's result")]
)
async def test_an_on_publish_that_does_not_send_fails_the_attempt_and_nothing_is_acknowledged(
    settings: Settings, topic: str, middleware: object, named: str
) -> None:
    out = f"{topic}-out"
    router = Router(middleware=[middleware])

    @router.subscribe(topic, "g", initial_position="earliest", returns_to=out, max_retries=1, retry_backoff=0)
    async def double(n: int) -> int:
        return n * 2

    async with EventBus(settings, routers=[]) as plain:
        await plain.publish(topic, 21)
    async with Harness(settings, [router]) as app:
        [dead] = await app.wait_dead_lettered(group="g", timeout=20)
        url = app.bus.url
        assert [h.outcome for h in app.handled] == ["retried", "dead_lettered"]
    assert dead.error_type == "MiddlewareError" and type(middleware).__name__ in dead.error and named in dead.error
    stored = _stored(settings, url, out)
    if isinstance(middleware, Dropping):
        assert stored == [], "the output was never sent"
    else:
        assert [m.data() for m in stored] == [b"42", b"42"], "sent on each attempt: stored twice, never lost"

    async with EventBus(settings, routers=[router]) as bus:
        with pytest.raises(Exception, match=named):  # outside a handler too: the caller hears of it
            await bus.publish(out, 1)


async def test_a_middleware_calling_call_next_twice_runs_the_handler_once_and_fails_the_attempt(
    settings: Settings, topic: str
) -> None:
    calls: list[int] = []

    async def twice(message: object, call_next: Any) -> Any:
        await call_next(message)
        return await call_next(message)

    router = Router(middleware=[twice])

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=0)
    async def charge(n: int) -> None:
        calls.append(n)

    async with Harness(settings, [router]) as app:
        await app.publish(topic, 7)
        [dead] = await app.wait_dead_lettered(group="g", timeout=20)
    assert calls == [7], "once per attempt"
    assert "twice called call_next twice in one attempt" in dead.error


# -- request/reply: no reply that lies, no reply anywhere a message's author asks -----------------------


class OutIsDown:
    """The output topic refuses every publish; the reply topic takes them."""

    async def on_publish(self, outgoing: Outgoing, call_next: PublishNext) -> object:
        if outgoing.topic.endswith("-out"):
            raise ConnectionError("the output topic is down")
        return await call_next(outgoing)


async def test_a_request_hears_success_only_after_the_outputs_are_stored(settings: Settings, topic: str) -> None:
    out = f"{topic}-out"
    router = Router(middleware=[OutIsDown()])

    @router.subscribe(topic, "g", initial_position="earliest", returns_to=out, max_retries=1, retry_backoff=0)
    async def quote(n: int) -> int:
        return n * 2

    async with Harness(settings, [router]) as app, EventBus(settings, routers=[]) as requester:
        with pytest.raises(RequestFailed) as failed:
            await requester.request(topic, 1, timeout=30)
        assert failed.value.reason == "handler-failed" and "the output topic is down" in failed.value.error
        await app.wait_dead_lettered(group="g", timeout=20)
        assert requester.late_replies == 0, "no success reply came first"
        url = app.bus.url
    assert _stored(settings, url, out) == []


async def test_forged_reply_addresses_write_nothing_anywhere(
    settings: Settings, topic: str, broker_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    victim, dead_letters = f"{topic}-victim", f"{topic}-g-DLQ"
    forged = [settings.topic(victim), settings.topic(dead_letters), settings.topic(f"{topic}-g-RETRY")]
    other_namespace = "persistent://public/elsewhere/eventbus-replies-0123456789abcdef"
    if broker_kind == "embedded":  # Apache Pulsar refuses a namespace that does not exist: nothing to read back
        forged.append(other_namespace)
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=0)
    async def answer(n: int) -> int:
        if n < 0:
            raise ValueError("a failure's text must not leak either")
        return n

    async with Harness(settings, [router]) as app:
        url = app.bus.url
        client = raw_client(url, settings.jwt())
        try:
            producer = client.create_producer(settings.topic(topic))
            for n, address in enumerate(forged):
                for sign in (1, -1):
                    correlation = uuid.uuid4().hex
                    producer.send(str(sign * (n + 1)).encode(), properties={
                        "eventbus-reply-to": address, "eventbus-correlation-id": correlation,
                    })
            producer.close()
        finally:
            client.close()
        await app.wait_handled(len(forged), topic=topic, timeout=20)
        await app.wait_dead_lettered(len(forged), group="g", timeout=20)
        assert app.published == [], "the responder published nothing"
    assert _stored(settings, url, victim) == []
    assert sorted(m.data() for m in _stored(settings, url, dead_letters)) == sorted(
        str(-(n + 1)).encode() for n in range(len(forged))
    ), "only the real dead letters, none planted"
    if broker_kind == "embedded":
        assert _stored(settings, url, other_namespace) == []
    said = [r.getMessage() for r in caplog.records if "ignored the reply address" in r.getMessage()]
    assert len(said) == 1 and "said once per handler" in said[0]


async def test_keyless_requests_spread_over_the_responders_concurrency(settings: Settings, topic: str) -> None:
    in_flight, most = 0, 0
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", concurrency=8)
    async def slow(n: int) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)  # work that takes time, not a synchronisation
        in_flight -= 1
        return n

    async with Harness(settings, [router]) as app, EventBus(settings, routers=[]) as requester:
        replies = await asyncio.gather(*(requester.request(topic, n, timeout=60) for n in range(40)))
        url = app.bus.url
    assert replies == list(range(40))
    assert most > 1, "keyless requests ran one at a time"
    stored = _stored(settings, url, topic)
    assert len(stored) == 40
    assert all(m.partition_key() == m.properties()["eventbus-correlation-id"] for m in stored), "keyed by correlation"


def test_the_forged_address_warning_names_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    from eventbus.service.returns import Answers

    answers = Answers("h", None, None, True, "persistent://shop/orders/quotes")  # type: ignore[arg-type]
    mine = "persistent://shop/orders/eventbus-replies-0123456789abcdef"
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        assert answers.reply_address({"eventbus-reply-to": mine, "eventbus-correlation-id": "a" * 32}) == (mine, "a" * 32)
        for address, correlation in [
            ("persistent://shop/other/eventbus-replies-0123456789abcdef", "a" * 32),  # another namespace
            ("persistent://shop/orders/quotes-g-DLQ", "a" * 32),
            (mine + "-g-DLQ", "a" * 32),
            (mine, ""),  # no correlation id: a request never lacks one
            (mine, "x\ny"),
        ]:
            assert answers.reply_address({"eventbus-reply-to": address, "eventbus-correlation-id": correlation}) is None
        assert answers.reply_address({}) is None
    [line] = [r.getMessage() for r in caplog.records]
    assert "persistent://shop/orders" in line and "eventbus-replies-<id>" in line


# -- a graceful stop of a worker that asks itself -------------------------------------------------------

_ASKS_ITSELF = """
import asyncio, os
from pathlib import Path
from eventbus import EventBus, Router

TOPIC, RECORD = os.environ["EB_TOPIC"], Path(os.environ["EB_RECORD"])
router = Router()


def note(line: str) -> None:
    with RECORD.open("a") as f:
        f.write(line + "\\n")
        f.flush()
        os.fsync(f.fileno())


@router.subscribe(TOPIC, "shop", initial_position="earliest", concurrency=4)
async def order(n: int, bus: EventBus) -> None:
    price = await bus.request(TOPIC + "-pricing", n, timeout=20)
    note(f"ordered {n} {price}")


@router.subscribe(TOPIC + "-pricing", "pricing", initial_position="earliest", concurrency=4)
async def pricing(n: int) -> int:
    note(f"priced {n}")
    await asyncio.sleep(0.1)
    return n * 10
"""


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_worker_answering_its_own_requests_stops_at_once_and_handles_no_request_twice(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path, workers: int, broker_kind: str
) -> None:
    from .test_worker_process import Worker

    if workers > 1 and broker_kind == "embedded":
        pytest.skip("--workers N shares a subscription on Apache Pulsar: the embedded broker runs one consumer each")

    (tmp_path / "asks_itself.py").write_text(_ASKS_ITSELF)
    record = tmp_path / "record.txt"
    env = {
        **subprocess_env, "EB_TOPIC": topic, "EB_RECORD": str(record), "EVENTBUS_SHUTDOWN_DRAIN_TIMEOUT": "30",
        "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}",
    }

    def noted(what: str) -> list[int]:
        text = record.read_text() if record.exists() else ""
        return [int(line.split()[1]) for line in text.splitlines() if line.startswith(what)]

    async with EventBus(settings, routers=[]) as bus:
        await bus.publish_batch(topic, list(range(40)), key=None)
    first = Worker(env, tmp_path / "first.log", "asks_itself:router", "--workers", str(workers))
    try:
        await first.wait_subscribed()
        await eventually(lambda: len(noted("ordered")) >= 5, timeout=60, what="five orders")
        first.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert await first.wait_exit(60) == 0, first.text()
        took = time.monotonic() - began  # with the requests' 20 s timeout, the old stop took at least 20 s
    finally:
        first.kill()
    assert took < 8, f"the stop took {took:.1f}s\n{first.text()[-3000:]}"
    assert "drain timeout" not in first.text()
    second = Worker(env, tmp_path / "second.log", "asks_itself:router")
    try:
        await second.wait_subscribed()
        await eventually(lambda: len(noted("ordered")) == 40, timeout=90, what="every order")
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit(60) == 0, second.text()
    finally:
        second.kill()
    assert sorted(noted("ordered")) == list(range(40)), "each order handled once"
    assert sorted(noted("priced")) == list(range(40)), "each request handled once"


# -- refusals: an answer, not a failure -------------------------------------------------------------------


async def test_a_refusal_is_acknowledged_counted_logged_at_info_and_told_to_the_requester(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    from eventbus import Refuse

    caplog.set_level(logging.INFO, logger="eventbus")
    router = Router()

    @router.subscribe(topic, "stock", initial_position="earliest", max_retries=3)
    async def reserve(sku: str) -> str:
        if sku == "gone":
            raise Refuse(f"out of stock: {sku}")
        return f"reserved {sku}"

    observed = settings.model_copy(update={"metrics": True})
    async with Harness(observed, [router]) as app, EventBus(settings, routers=[]) as requester:
        with pytest.raises(RequestFailed) as refused:
            await requester.request(topic, "gone", timeout=20)
        assert (refused.value.reason, refused.value.error_type, refused.value.error) == (
            "refused", "Refuse", "out of stock: gone"
        )
        assert await requester.request(topic, "tea", timeout=20) == "reserved tea"
        await app.publish(topic, "gone")  # no requester: acknowledged all the same
        await app.wait_handled(2, topic=topic, outcome="refused", timeout=20)
        assert [h.outcome for h in app.handled] == ["refused", "ok", "refused"], "each tried once, never retried"
        assert app.dead_letters == []
        assert app.bus.metrics is not None
        assert app.bus.metrics.subscription(settings.topic(topic), "stock").outcomes["refused"] == 2
        url = app.bus.url
    assert _stored(settings, url, f"{topic}-stock-DLQ") == []
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert lines and {r.levelname for r in lines} == {"INFO"}
    async with Harness(settings, [router]) as again:  # nothing comes back: the refusals were acknowledged
        await again.publish(topic, "cake")
        await again.wait_handled(topic=topic, timeout=20)
        assert [h.payload for h in again.handled] == ["cake"]
    result = await call_handler(reserve, "gone", routers=[router])
    assert (result.outcome, result.reason, str(result.error)) == ("refused", "refused", "out of stock: gone")


async def test_a_batch_item_refused_is_acknowledged_alone(settings: Settings, topic: str) -> None:
    from eventbus import Refuse

    router = Router()
    seen: list[list[int]] = []

    @router.subscribe(topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(5, 1.0))
    async def load(records: list[int]) -> None:
        seen.append(records)
        if 3 in records:
            raise BatchFailed({records.index(3): Refuse("three is not ours")})

    async with EventBus(settings, routers=[]) as publisher:
        await publisher.publish_batch(topic, [1, 2, 3, 4, 5])
    async with Harness(settings, [router]) as app:
        await app.wait_handled(1, topic=topic, outcome="refused", timeout=20)
        await app.wait_handled(4, topic=topic, timeout=20)
        assert app.dead_letters == []
    assert sorted(n for batch in seen for n in batch) == [1, 2, 3, 4, 5], "nothing retried"


# -- batches: a failure holds only itself ------------------------------------------------------------


async def test_a_failing_key_in_a_batch_waits_alone_while_the_other_keys_go_on(settings: Settings, topic: str) -> None:
    """21 keys, one always failing: the other keys' next messages are handled during its backoffs, not after."""
    events: list[tuple[str, int]] = []
    router = Router()

    @router.subscribe(
        topic, "g", initial_position="earliest", batch=Batch(50, 0.05), max_retries=2, retry_backoff=1.0,
    )
    async def load(records: list[dict]) -> None:
        events.extend((r["key"], r["round"]) for r in records)
        bad = [i for i, r in enumerate(records) if r["key"] == "bad"]
        if bad:
            raise BatchFailed({i: ConnectionError("bad is down") for i in bad})

    keys = ["bad", *(f"k{n}" for n in range(20))]
    async with Harness(settings, [router]) as app:
        for key in keys:
            await app.publish(topic, {"key": key, "round": 1}, key=key)
        await app.wait_handled(20, topic=topic, timeout=20)  # round 1 of the good keys, acknowledged at once
        for key in keys[1:]:
            await app.publish(topic, {"key": key, "round": 2}, key=key)
        await app.wait_handled(40, topic=topic, timeout=20)
        [dead] = await app.wait_dead_lettered(group="g", timeout=30)
    assert dead.key == "bad" and dead.attempts == 3
    bad_attempts = [i for i, (key, _) in enumerate(events) if key == "bad"]
    round_two = [i for i, (_, r) in enumerate(events) if r == 2]
    assert len(round_two) == 20 and max(round_two) < bad_attempts[-1], "the good keys waited for the bad one"


_KILLED_IN_BACKOFF = """
import os
from pathlib import Path
from eventbus import Batch, BatchFailed, Router

TOPIC, RECORD, ROLE = os.environ["EB_TOPIC"], Path(os.environ["EB_RECORD"]), os.environ["EB_ROLE"]
router = Router()


@router.subscribe(
    TOPIC, "g", subscription_type="shared", initial_position="earliest", batch=Batch(50, 0.5), retry_backoff=60,
    retry_backoff_max=60,
)
async def load(records: list[int]) -> None:
    with RECORD.open("a") as f:
        f.write(ROLE + " " + " ".join(map(str, records)) + "\\n")
        f.flush()
        os.fsync(f.fileno())
    if ROLE == "first" and 0 in records:
        raise BatchFailed({records.index(0): ConnectionError("zero is down")})
"""


async def test_a_batch_killed_in_a_failed_items_backoff_sends_back_only_the_failed_item(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path, broker_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    from .pulsar_admin import admin
    from .test_worker_process import Worker

    if broker_kind == "embedded":
        pytest.skip("the backlog to wait for before the kill is read from Apache Pulsar's admin API")
    pulsar = request.getfixturevalue(broker_kind)
    (tmp_path / "killed_in_backoff.py").write_text(_KILLED_IN_BACKOFF)
    record = tmp_path / "record.txt"
    env = {**subprocess_env, "EB_TOPIC": topic, "EB_RECORD": str(record),
           "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}

    def seen(role: str) -> list[int]:
        text = record.read_text() if record.exists() else ""
        return [int(n) for line in text.splitlines() if line.startswith(role) for n in line.split()[1:]]

    def backlog() -> int:
        stats: Any = admin(pulsar, "GET", "/admin/v2/" + settings.topic(topic).replace("://", "/") + "/stats")
        return int(stats["subscriptions"]["g"]["msgBacklog"])

    async with EventBus(settings, routers=[]) as bus:
        for n in range(20):
            await bus.publish(topic, n)  # one entry each: the broker tracks each acknowledgement
    first = Worker({**env, "EB_ROLE": "first"}, tmp_path / "first.log", "killed_in_backoff:router")
    try:
        await first.wait_subscribed()
        await eventually(lambda: sorted(set(seen("first"))) == list(range(20)), timeout=60, what="all twenty")
        await eventually(lambda: backlog() == 1, timeout=30, what="every success acknowledged during the backoff")
        first.proc.send_signal(signal.SIGKILL)
        assert await first.wait_exit(30) == -signal.SIGKILL
    finally:
        first.kill()
    second = Worker({**env, "EB_ROLE": "second"}, tmp_path / "second.log", "killed_in_backoff:router")
    try:
        await second.wait_subscribed()
        await eventually(lambda: seen("second") == [0], timeout=60, what="the failed item, redelivered")
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit(60) == 0
    finally:
        second.kill()
    assert seen("second") == [0], "only the failed item came back"


# -- lifespans: every exit runs, bounded, each failure named ---------------------------------------------


def pool() -> Iterator[str]:
    yield "pool"
    raise OSError("pool cleanup boom")


Pool = Annotated[str, Depends(pool, scope="app")]


async def test_a_hanging_or_raising_exit_is_named_bounded_and_every_other_exit_still_runs(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    exits: list[str] = []
    router = Router()

    @router.lifespan
    @asynccontextmanager
    async def database(bus: EventBus) -> AsyncIterator[None]:
        yield
        exits.append("database")

    @router.lifespan
    @asynccontextmanager
    async def stuck_cache(bus: EventBus) -> AsyncIterator[None]:
        yield
        await asyncio.Event().wait()  # never ends

    @router.lifespan
    @asynccontextmanager
    async def broken_audit(bus: EventBus) -> AsyncIterator[None]:
        yield
        raise RuntimeError("lifespan exit boom")

    @router.subscribe(topic, "g", initial_position="earliest")
    async def handle(n: int, p: Pool) -> None:
        pass

    quick = settings.model_copy(update={"shutdown_exit_timeout": 1.0})
    async with EventBus(quick, routers=[router]) as bus:
        with anyio.fail_after(20):  # a bound on the test, not a synchronisation: the stop must end by itself
            async with anyio.create_task_group() as tg:
                await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
                bus.stop()
    assert exits == ["database"], "the first lifespan's exit ran after the others failed"
    errors = {r.getMessage(): r for r in caplog.records if r.levelname == "ERROR"}
    [boom] = [r for m, r in errors.items() if "broken_audit" in m and "raised on exit" in m]
    assert "RuntimeError: lifespan exit boom" in boom.getMessage() and boom.exc_info is not None
    [cleanup] = [r for m, r in errors.items() if "pool" in m and "raised on exit" in m]
    assert "OSError: pool cleanup boom" in cleanup.getMessage() and cleanup.exc_info is not None
    assert any("stuck_cache did not exit within EVENTBUS_SHUTDOWN_EXIT_TIMEOUT=1s" in m for m in errors)


@pytest.mark.parametrize("raised", [SystemExit(0), asyncio.CancelledError(), KeyError("cfg")], ids=repr)
async def test_a_lifespan_failing_on_entry_in_any_way_is_startup_failed(
    settings: Settings, topic: str, raised: BaseException
) -> None:
    from eventbus import StartupFailed

    router = Router()

    @router.lifespan
    @asynccontextmanager
    async def config(bus: EventBus) -> AsyncIterator[None]:
        raise raised
        yield

    router.subscribe(topic, "g")(lambda n: None)
    async with EventBus(settings, routers=[router]) as bus:
        with pytest.raises(StartupFailed) as failed:
            await bus.run(handle_signals=False)
    assert "lifespan" in str(failed.value) and "config" in str(failed.value)
    assert type(raised).__name__ in str(failed.value)


def flaky_session() -> Iterator[str]:
    yield "session"
    raise OSError("session close boom")


Session = Annotated[str, Depends(flaky_session)]


async def test_a_cleanup_failing_after_the_handler_succeeded_is_logged_and_the_message_counts_as_handled(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest", max_retries=2, retry_backoff=0)
    async def charge(n: int, session: Session) -> None:
        calls.append(n)  # a side effect a retry would repeat

    async with Harness(settings, [router]) as app:
        await app.publish(topic, 5)
        await app.wait_handled(topic=topic, timeout=20)
        assert [h.outcome for h in app.handled] == ["ok"] and app.dead_letters == []
    assert calls == [5]
    [line] = [r for r in caplog.records if "dependency's cleanup raised" in r.getMessage()]
    assert line.levelname == "ERROR" and "OSError: session close boom" in line.getMessage() and line.exc_info


# -- the test kit runs what the worker runs ------------------------------------------------------------


class Stamp:
    async def on_publish(self, outgoing: Outgoing, call_next: PublishNext) -> object:
        return await call_next(outgoing.with_properties(stamped="yes"))


async def test_call_handler_answers_requests_from_responses_and_runs_the_publish_middleware() -> None:
    router = Router(middleware=[Stamp()])

    @router.subscribe("orders", "billing", returns_to="invoices")
    async def charge(order: dict, bus: EventBus) -> dict:
        quote = await bus.request("pricing", order["sku"], timeout=5)
        return {"order": order["id"], "total": quote["price"] * order["qty"]}

    result = await call_handler(
        charge, {"id": "o-1", "sku": "tea", "qty": 2}, routers=[router],
        responses={"pricing": lambda sku: {"sku": sku, "price": 4.5}},
    )
    assert result.ok and result.returned == {"order": "o-1", "total": 9.0}
    assert [(p.topic.rsplit("/", 1)[1], p.payload, p.properties) for p in result.published] == [
        ("pricing", "tea", {"stamped": "yes"}), ("invoices", result.returned, {"stamped": "yes"}),
    ]
    refused = await call_handler(
        charge, {"id": "o-2", "sku": "gone", "qty": 1}, routers=[router],
        responses={"pricing": RequestFailed("pricing", reason="refused", error_type="Refuse", error="no price")},
    )
    assert refused.outcome == "retry" and isinstance(refused.error, RequestFailed)
    unanswered = await call_handler(charge, {"id": "o-3", "sku": "tea", "qty": 1}, routers=[router])
    assert isinstance(unanswered.error, LookupError) and "responses={'pricing': ...}" in str(unanswered.error)


async def test_a_request_to_a_batch_handler_is_answered_and_a_returned_value_is_warned_of_once(
    settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = Router()

    @router.subscribe(topic, "g", subscription_type="shared", initial_position="earliest", batch=Batch(10, 0.05))
    async def load(records: list[int]) -> int:
        return len(records)

    async with Harness(settings, [router]), EventBus(settings, routers=[]) as requester:
        replies = await asyncio.gather(*(requester.request(topic, n, timeout=20) for n in range(3)))
    assert replies == [None, None, None], "each request handled in a batch hears it was handled"
    lines = [r.getMessage() for r in caplog.records if "goes nowhere" in r.getMessage()]
    assert len(lines) == 1 and "a batch handler publishes what it makes" in lines[0]


async def test_a_middleware_that_skips_the_handler_of_a_request_gives_the_requester_a_refusal(
    settings: Settings, topic: str
) -> None:
    """It may return early (a filter); a requester then took its return value for the handler's answer."""

    async def closed_on_sundays(message: Any, call_next: Any) -> Any:
        if message.properties.get("day") == "sunday":
            return "skipped"  # never the handler's answer
        return await call_next(message)

    router = Router(middleware=[closed_on_sundays])
    handled: list[str] = []

    @router.subscribe(topic, "pricing", initial_position="earliest", max_retries=3)
    async def price(sku: str) -> str:
        handled.append(sku)
        return f"price of {sku}"

    async with Harness(settings, [router]) as app, EventBus(settings, routers=[]) as requester:
        with pytest.raises(RequestFailed) as refused:
            await requester.request(topic, "tea", properties={"day": "sunday"}, timeout=20)
        assert (refused.value.reason, refused.value.error_type) == ("refused", "Refuse")
        assert "closed_on_sundays returned without calling the handler" in refused.value.error
        assert await requester.request(topic, "tea", properties={"day": "monday"}, timeout=20) == "price of tea"
        await app.publish(topic, "cake", properties={"day": "sunday"})  # no requester: a filter, as before
        await app.wait_handled(2, topic=topic, timeout=20)
        assert [h.outcome for h in app.handled] == ["refused", "ok", "ok"], "the request not retried"
        assert app.dead_letters == [] and handled == ["tea"]


_REQUESTER = """
import asyncio, sys
from eventbus import EventBus, Settings

async def main() -> None:
    async with EventBus(Settings()) as bus:
        print(await bus.request(sys.argv[1], "tea", timeout=30), flush=True)
        print(bus._requester.topic, flush=True)
        await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "plain-sigterm"])
async def test_a_requester_that_ends_without_closing_leaves_no_subscription_on_its_reply_topic(
    settings: Settings, subprocess_env: dict[str, str], topic: str, kill: signal.Signals, request: pytest.FixtureRequest
) -> None:
    """Its durable reply subscription stayed on Apache Pulsar for good (20 minutes and counting), holding replies."""
    import subprocess
    import sys

    from .pulsar_admin import admin

    if not settings.url:
        pytest.skip("the embedded broker's reply subscription is removed at close; a topic's stats are Apache Pulsar's")
    pulsar = request.getfixturevalue("pulsar")
    router = Router()

    @router.subscribe(topic, "pricing", initial_position="earliest")
    async def price(sku: str) -> str:
        return f"price of {sku}"

    def subscriptions(reply_topic: str) -> dict:
        stats: Any = admin(pulsar, "GET", "/admin/v2/" + reply_topic.replace("://", "/") + "/stats")
        return dict(stats["subscriptions"])

    async with Harness(settings, [router]):
        requester = subprocess.Popen(
            [sys.executable, "-c", _REQUESTER, topic], env=subprocess_env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert requester.stdout is not None
            answer, reply_topic = [(await anyio.to_thread.run_sync(requester.stdout.readline)).strip() for _ in range(2)]
            assert answer == "price of tea", answer
            assert len(subscriptions(reply_topic)) == 1, "the requester reads its replies while it runs"
            requester.send_signal(kill)
            assert requester.wait(timeout=30) == -kill
        finally:
            requester.kill()
        await eventually(lambda: subscriptions(reply_topic) == {}, timeout=60, what="no subscription left")


async def test_a_responder_closes_a_reply_producer_once_its_requester_is_quiet_and_answers_it_again_later(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A responder answering 500 requester buses kept 501 reply producers until it stopped."""
    from eventbus.publishing import producers

    monkeypatch.setattr(producers, "IDLE_REPLY_SECONDS", 0.2)
    router = Router()

    @router.subscribe(topic, "pricing", initial_position="earliest")
    async def price(sku: str) -> str:
        return f"price of {sku}"

    def reply_producers(app: Harness) -> list[str]:
        return [t for t in app.bus._producers.topics if "eventbus-replies-" in t]

    async with Harness(settings, [router]) as app:
        async with EventBus(settings, routers=[]) as first, EventBus(settings, routers=[]) as second:
            assert [await bus.request(topic, "tea", timeout=20) for bus in (first, second)] == ["price of tea"] * 2
            assert len(reply_producers(app)) == 2
            await eventually(lambda: reply_producers(app) == [], what="both idle reply producers closed")
            assert await first.request(topic, "cake", timeout=20) == "price of cake", "answered again on a new one"
            assert len(reply_producers(app)) == 1
