"""What a new user trips on: a publish without await, a decorated handler, an import error, odd words and ids."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eventbus import EventBus, Router, Settings
from eventbus.broker.client import id_text
from eventbus.testing import Harness, call_handler

from .conftest import eventually
from .test_worker_process import Worker, cli, one_line_error


def _forgetful(topic: str) -> Router:
    router = Router()

    @router.subscribe(topic, "billing", max_retries=1, retry_backoff=0.01)
    async def charge(order: dict, bus: EventBus) -> None:
        bus.publish("invoices", {"order": order["n"]})  # no await: nothing would be sent

    @router.subscribe(topic, "audit")
    async def audit(order: dict, bus: EventBus) -> None:
        import asyncio

        await asyncio.create_task(bus.publish("audited", order))  # a task: awaited through it, fine

    return router


async def test_a_publish_without_await_in_a_handler_fails_its_attempt_naming_handler_and_topic(
    settings: Settings, topic: str
) -> None:
    async with Harness(settings, [_forgetful(topic)]) as app:
        await app.publish(topic, {"n": 1})
        [dead] = await app.wait_dead_lettered(group="billing")
        await app.wait_published(topic="audited")
        handled = [h for h in app.handled if h.group == "billing"]
    assert [h.outcome for h in handled] == ["retried", "dead_lettered"]
    assert dead.reason == "handler-failed" and dead.error_type == "UnawaitedPublish"
    assert "charge called bus.publish('invoices', ...) without await at " in dead.error
    assert "test_newcomer_traps.py:" in dead.error and "write `await bus.publish(...)`" in dead.error
    assert not [p for p in app.published if p.topic.endswith("/invoices")], "nothing was sent"


async def test_call_handler_reports_a_publish_without_await() -> None:
    router = _forgetful("orders")
    [charge] = [s for s in router.subscriptions if s.group == "billing"]
    result = await call_handler(charge, {"n": 1})
    assert result.outcome == "retry" and type(result.error).__name__ == "UnawaitedPublish"
    assert result.published == []


def test_a_publish_without_await_outside_handlers_is_an_error_line_naming_the_caller(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "forgot.py"
    script.write_text(
        "import asyncio, gc, pathlib\nfrom eventbus import EventBus, Settings\n\n"
        "async def place_order(bus):\n"
        "    bus.publish('orders', {'id': 1})\n\n"
        "async def main():\n"
        f"    async with EventBus(Settings(_env_file=None, data_dir=pathlib.Path({str(tmp_path / 'data')!r})),"
        " routers=[]) as bus:\n"
        "        await place_order(bus)\n"
        "        gc.collect()\n\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([sys.executable, str(script)], env=base_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"bus.publish('orders', ...) called in place_order at {script}:5 was never awaited" in result.stderr
    assert "RuntimeWarning" not in result.stderr


def _async_decorator(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


async def test_an_async_decorator_around_a_sync_handler_runs_the_handler(settings: Settings, topic: str) -> None:
    ran: list[int] = []
    router = Router()

    @router.subscribe(topic, "g")
    @_async_decorator
    def handle(order: dict) -> None:
        ran.append(order["n"])

    result = await call_handler(handle, {"n": 0}, routers=[router])
    assert result.ok and ran == [0]
    async with Harness(settings, [router]) as app:
        await app.publish(topic, {"n": 1})
        await app.wait_handled()
    assert ran == [0, 1]


async def test_a_plain_function_returning_a_coroutine_fails_its_attempt_saying_so() -> None:
    router = Router()

    async def later(order: dict) -> None: ...

    @router.subscribe("orders", "g")
    def handle(order: dict) -> Any:
        return later(order)  # a plain function: it runs in a thread, and nobody awaits what it returns

    result = await call_handler(handle, {"n": 0}, routers=[router])
    assert result.outcome == "retry" and "returned coroutine, which nobody awaits" in str(result.error)


def test_an_import_error_in_the_users_module_shows_its_traceback_then_our_line(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "shopapp.py").write_text("import os\n\nDATABASE = os.environ['SHOP_DATABASE_URL']\n")
    (tmp_path / "broken.py").write_text("def handler(:\n    pass\n")
    env = {**base_env, "PYTHONPATH": f"{tmp_path}:{base_env['PYTHONPATH']}"}
    for module, where, what in [
        ("shopapp", f'File "{tmp_path / "shopapp.py"}", line 3', "KeyError: 'SHOP_DATABASE_URL'"),
        ("broken", f'File "{tmp_path / "broken.py"}", line 1', "SyntaxError"),
    ]:
        result = cli(env, "run", module)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and where in result.stderr, result.stderr
        assert lines[-1].startswith(f"error: cannot import handler module {module!r}: ") and what in lines[-1]
        assert "importlib" not in result.stderr and "eventbus/app.py" not in result.stderr
    missing = cli(env, "run", "no_such_shop")
    assert one_line_error(missing) == "error: cannot import handler module 'no_such_shop': ModuleNotFoundError: " \
        "No module named 'no_such_shop'"


async def test_a_handlers_own_log_lines_carry_the_messages_fields_in_json(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "chatty.py").write_text(
        "import logging, os\nfrom eventbus import subscribe\nlog = logging.getLogger('shop')\n"
        "@subscribe(os.environ['EB_TOPIC'], 'billing', initial_position='earliest')\n"
        "def charge(order: dict) -> None:\n    log.info('charging %s', order['n'])\n"
    )
    env = {**subprocess_env, "EB_TOPIC": topic, "EVENTBUS_LOG_FORMAT": "json",
           "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    worker = Worker(env, tmp_path / "w.log", "chatty")
    try:
        await worker.wait_subscribed()
        async with EventBus(settings, routers=[]) as bus:
            sent = await bus.publish(topic, {"n": 7}, key="k7")
        await eventually(lambda: "charging 7" in worker.text(), what="the handler's line")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0
    finally:
        worker.kill()
    [line] = [json.loads(x) for x in worker.text().splitlines() if x.startswith("{") and "charging 7" in x]
    assert (line["logger"], line["topic"], line["group"], line["key"], line["attempt"]) == (
        "shop", settings.topic(topic), "billing", "k7", 1
    )
    assert line["message_id"] == id_text(sent)


async def test_a_message_id_prints_as_the_cli_and_logs_print_it(settings: Settings, topic: str) -> None:
    async with EventBus(settings, routers=[]) as bus:
        sent = await bus.publish(topic, 1)
    assert str(sent) == id_text(sent) and str(sent).count(":") == 3 and not str(sent).startswith("(")


def test_status_on_the_embedded_broker_prints_only_our_lines(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**base_env, "EVENTBUS_DATA_DIR": str(tmp_path / "data"), "EB_TOPIC": "orders"}
    published = cli(env, "publish", "orders", '{"n": 1}')
    assert published.returncode == 0, published.stderr
    status = cli(env, "status", "--topic", "orders", "--group", "billing")
    assert status.returncode == 0, status.stderr
    assert [line for line in status.stderr.splitlines() if "embedded broker has no admin API" not in line] == []


def test_words_a_newcomer_reads(base_env: dict[str, str], tmp_path: Path) -> None:
    elsewhere = subprocess.run([sys.executable, "-m", "eventbus", "status"], env=base_env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
    assert "handlers.demo" not in elsewhere.stderr and "name the app" in one_line_error(elsewhere)
    from eventbus.broker.client import build_message
    from eventbus.registry import Publication

    with pytest.raises(TypeError) as wrong_type:
        Publication("invoices", dict).check([1])
    assert str(wrong_type.value).endswith("not list: pass dict(...) instead")
    with pytest.raises(TypeError) as not_str:
        build_message(b"", None, properties={"n": 1})  # type: ignore[dict-item]
    assert str(not_str.value) == (
        "message property 'n'=1: names and values must be str, and 1 is of type int; convert it with str()"
    )
