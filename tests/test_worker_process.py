"""The worker as users run it: `python -m eventbus run` in its own process, signals and all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from eventbus import EventBus, Router, Settings

from .conftest import eventually, running

pytestmark = pytest.mark.slow


class Worker:
    def __init__(self, env: dict[str, str], log: Path, *args: str, cwd: Path | None = None) -> None:
        """`eventbus run ARGS` with its output in `log`."""
        self.log = log
        self.out = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "run", *args], env=env, stdout=self.out, stderr=subprocess.STDOUT, cwd=cwd
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_subscribed(self) -> None:
        await eventually(lambda: "subscribed" in self.text() or self.proc.poll() is not None, what="worker start")
        assert self.proc.poll() is None, self.text()

    async def wait_exit(self, timeout: float = 30) -> int:
        await eventually(lambda: self.proc.poll() is not None, timeout=timeout, what="worker exit")
        self.out.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def lines(path: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def worker_env(subprocess_env: dict[str, str], topic: str, tmp_path: Path) -> dict[str, str]:
    return {**subprocess_env, "EB_TOPIC": topic, "EB_RECORD": str(tmp_path / "record.txt")}


async def test_killed_workers_unacked_message_goes_to_the_next_worker(
    settings: Settings, topic: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    first = Worker({**worker_env, "EB_BLOCK": "1"}, tmp_path / "w1.log", "tests.apps.recorder")
    try:
        await first.wait_subscribed()
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 1, key="k")
            await bus.publish(topic, 2, key="k")
        await eventually(lambda: "start 1" in lines(record), what="worker 1 to take message 1")
        first.proc.send_signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL
    finally:
        first.kill()
    assert "done 1" not in lines(record)

    second = Worker(worker_env, tmp_path / "w2.log", "tests.apps.recorder")
    try:
        await second.wait_subscribed()
        await eventually(lambda: "done 2" in lines(record), what="worker 2 to handle both messages")
        done = [line for line in lines(record) if line.startswith("done")]
        assert done == ["done 1", "done 2"], "redelivered in key order"
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit() == 0
    finally:
        second.kill()


async def test_sigterm_drains_the_in_flight_handler_then_exits_zero(
    settings: Settings, topic: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    worker = Worker({**worker_env, "EB_SLOW": "1.0"}, tmp_path / "w.log", "tests.apps.recorder")
    try:
        await worker.wait_subscribed()
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 1, key="k")
        await eventually(lambda: "start 1" in lines(record), what="the handler to start")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0, worker.text()
    finally:
        worker.kill()
    assert lines(record) == ["start 1", "done 1"]
    assert "Traceback" not in worker.text()

    # Acknowledged before exit: the same group sees only what comes next.
    seen: list[int] = []
    router = Router()
    router.subscribe(topic, "workers", initial_position="earliest")(seen.append)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, 2, key="k")
        await eventually(lambda: seen, what="the marker")
    assert seen == [2]


async def test_second_signal_exits_at_once(worker_env: dict[str, str], settings: Settings, topic: str, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    worker = Worker({**worker_env, "EB_BLOCK": "1"}, tmp_path / "w.log", "tests.apps.recorder")
    try:
        await worker.wait_subscribed()
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 1)
        await eventually(lambda: "start 1" in lines(record))
        worker.proc.send_signal(signal.SIGINT)
        await eventually(lambda: "shutting down" in worker.text(), what="the first signal to be seen")
        worker.proc.send_signal(signal.SIGINT)
        assert await worker.wait_exit(timeout=5) == 128 + signal.SIGINT
    finally:
        worker.kill()


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


@pytest.mark.parametrize(
    ("extra_env", "args", "code", "words"),
    [
        ({}, ["run", "no_such_module"], 2, "cannot import handler module 'no_such_module'"),
        ({}, ["run", "tests.apps.bad_options"], 2, "tests.apps.bad_options.charge: subscription_type='fanout'"),
        ({"EVENTBUS_URL": "http://localhost:6650"}, ["run", "tests.apps.bad_options"], 2, "scheme 'http'"),
        ({"EVENTBUS_URL": "pulsar://localhost:notaport"}, ["publish", "t", "1"], 2, "invalid port"),
        ({"EVENTBUS_CONSUMER_RECEIVER_QUEUE_SIZE": "lots"}, ["publish", "t", "1"], 2, "EVENTBUS_CONSUMER_RECEIVER_QUEUE_SIZE"),
        ({"EVENTBUS_URL": "pulsar://127.0.0.1:1"}, ["publish", "t", "1"], 1, "cannot reach the broker at 127.0.0.1:1"),
        ({}, ["publish", "t", "{not json"], 2, "not valid JSON"),
        ({"EVENTBUS_BROKER_URL": "pulsar://prod:6650"}, ["publish", "t", "1"], 2,
         "EVENTBUS_BROKER_URL is not a setting (did you mean EVENTBUS_URL?)"),
        ({"EVENTBUS_EMBEDDED": "false"}, ["publish", "t", "1"], 2, "no broker URL: set EVENTBUS_URL"),
        ({"EVENTBUS_LOG_LEVEL": "LOUD"}, ["publish", "t", "1"], 2, "EVENTBUS_LOG_LEVEL: Input should be"),
        ({}, ["run"], 2, "name the app: `myapp.handlers`"),
        ({}, ["run", "shop.py"], 2, "'shop.py' is a path: name the module instead, `shop`"),
        ({}, ["run", "tests.apps.misspelt_option"], 2, "did you mean concurrency?"),
        ({}, ["run", "tests.apps.no_parentheses"], 2, '@subscribe needs a topic and a group'),
        ({}, ["run", "tests.apps.router_app:routers"], 2, "module 'tests.apps.router_app' has no attribute 'routers'"),
        ({}, ["run", "tests.apps.router_app:os"], 2, "tests.apps.router_app:os is a module: name a Router"),
        ({}, ["publish", "orders/eu", "1"], 2, "topic 'orders/eu' is neither a short name nor a full name"),
        ({}, ["publish", "t", "@/no/such/file"], 2, "cannot read the payload from /no/such/file"),
    ],
    ids=[
        "import", "bad-option", "url-scheme", "url-port", "bad-number", "unreachable", "bad-json", "unknown-variable",
        "embedded-off", "setting-named-by-variable", "run-nothing", "run-a-path", "misspelt-option", "no-parentheses",
        "no-attribute", "not-a-router", "bad-topic", "unreadable-payload-file",
    ],
)
def test_cli_errors_are_one_line_with_exit_code(
    base_env: dict[str, str], tmp_path: Path, extra_env: dict[str, str], args: list[str], code: int, words: str
) -> None:
    result = cli({**base_env, "EVENTBUS_DATA_DIR": str(tmp_path / "embedded"), **extra_env}, *args)
    assert result.returncode == code, result.stderr
    assert words in one_line_error(result)


async def test_cli_publish_reaches_a_handler(settings: Settings, topic: str, subprocess_env: dict[str, str]) -> None:
    seen: list[dict] = []
    router = Router()
    router.subscribe(topic, "g", initial_position="earliest")(lambda body, msg=None: seen.append(body))

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        result = await anyio.to_thread.run_sync(
            lambda: cli(subprocess_env, "publish", topic, '{"id": 1}', "--key", "k", "-p", "source=cli")
        )
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"\d+:\d+:-?\d+:-?\d+", result.stdout.strip()), "ledger:entry:partition:batch"
        await eventually(lambda: seen)
    assert seen == [{"id": 1}]


async def test_a_second_process_joins_the_embedded_broker(base_env: dict[str, str], topic: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "embedded"
    env = {**base_env, "EVENTBUS_DATA_DIR": str(data_dir)}
    seen: list[dict] = []
    router = Router()
    router.subscribe(topic, "g", initial_position="earliest")(lambda body, msg=None: seen.append(body))

    async with EventBus(Settings(_env_file=None, data_dir=data_dir), routers=[router]) as bus, running(bus):
        pid = json.loads((data_dir / "broker.json").read_text())["pid"]  # where joiners find the broker
        result = await anyio.to_thread.run_sync(lambda: cli(env, "publish", topic, '{"from": "another process"}'))
        assert result.returncode == 0, result.stderr
        first_line = result.stderr.splitlines()[0]
        assert f"embedded broker (pulsar-lite 0." in first_line and str(data_dir) in first_line, result.stderr
        await eventually(lambda: seen, what="the other process's message")
        os.kill(pid, 0)  # the publisher left; the broker stays while we use it
    assert seen == [{"from": "another process"}]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        await anyio.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the last user stops the broker"


async def test_run_takes_a_router_by_module_and_attribute(
    settings: Settings, topic: str, worker_env: dict[str, str], tmp_path: Path
) -> None:
    worker = Worker(worker_env, tmp_path / "w.log", "tests.apps.router_app:router")
    try:
        await worker.wait_subscribed()
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, {"n": 1})
        await eventually(lambda: (tmp_path / "record.txt").exists(), what="the router's handler")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0
    finally:
        worker.kill()
    assert (tmp_path / "record.txt").read_text() == "{'n': 1}\n"


async def test_publish_reads_the_payload_from_stdin_or_a_file(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    big = {"blob": "x" * 200_000}  # past what an argument list takes on Linux (128 KB per argument)
    (tmp_path / "big.json").write_text(json.dumps(big))
    seen: list[dict] = []
    router = Router()
    router.subscribe(topic, "g", initial_position="earliest")(seen.append)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        from_file = await anyio.to_thread.run_sync(lambda: cli(subprocess_env, "publish", topic, f"@{tmp_path / 'big.json'}"))
        assert from_file.returncode == 0, from_file.stderr
        from_stdin = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "eventbus", "publish", topic, "-"], input='{"from": "stdin"}',
                env=subprocess_env, capture_output=True, text=True, timeout=60,
            )
        )
        assert from_stdin.returncode == 0, from_stdin.stderr
        await eventually(lambda: len(seen) == 2)
    assert seen == [big, {"from": "stdin"}]


def test_version_and_help_name_the_command_and_the_settings(base_env: dict[str, str]) -> None:
    script = Path(sys.executable).with_name("eventbus")
    version = subprocess.run([str(script), "--version"], env=base_env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and re.fullmatch(r"eventbus \d+\.\d+\.\d+\n", version.stdout), version
    help_text = subprocess.run([str(script), "run", "--help"], env=base_env, capture_output=True, text=True).stdout
    assert help_text.startswith("usage: eventbus run"), help_text
    assert "EVENTBUS_URL" in help_text and "EVENTBUS_EMBEDDED" in help_text
    as_module = cli(base_env, "--help")
    assert as_module.stdout.startswith("usage: python -m eventbus"), as_module.stdout


def test_the_example_app_is_not_installed_as_a_top_level_package(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in base_env.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('handlers'))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert found.stdout.strip() == "None", "a team's own `handlers` package would clash with the example app"


async def test_an_embedded_broker_whose_users_were_killed_stops_by_itself(base_env: dict[str, str], tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from eventbus.broker.embedded import EmbeddedBroker; "
         "b = EmbeddedBroker.acquire(Path(sys.argv[1]), idle_stop=2.0); print(b.pid, flush=True); time.sleep(600)",
         str(tmp_path)],
        env=base_env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        pid = int(holder.stdout.readline())
    finally:
        holder.kill()  # SIGKILL: no release, the broker is left behind
        holder.wait()
    assert Path(f"/proc/{pid}").exists(), "still up right after its user died: the next start may reuse it"
    await eventually(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, what="the idle broker to stop itself")
    assert not (tmp_path / "broker.json").exists()
