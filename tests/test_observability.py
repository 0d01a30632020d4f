"""What a running worker shows: Prometheus metrics and probes over HTTP, and JSON log lines."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eventbus import EventBus, Message, Router, Settings

from .conftest import eventually, running
from .test_logs import dead_letter_log
from .test_worker_process import cli


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when absent), as a Prometheus server parses it."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_metrics_count_what_the_worker_did(settings: Settings, topic: str) -> None:
    router = Router()
    handled: list[int] = []
    dead: list[Message] = []

    @router.subscribe(topic, "g", max_retries=1, retry_backoff=0.01, initial_position="earliest")
    async def handle(n: int, msg: Message) -> None:
        if n in (7, 14) or (n in (5, 10, 15) and msg.attempt == 1):
            raise RuntimeError("no")
        handled.append(n)

    dlq = settings.topic(topic) + "-g-DLQ"

    @router.subscribe(dlq, "reader", initial_position="earliest")
    async def read(data: bytes, msg: Message) -> None:
        dead.append(msg)

    observed = settings.model_copy(update={"metrics_port": 0})
    async with EventBus(observed, routers=[router]) as bus, running(bus):
        await bus.publish_batch(topic, range(20))
        await eventually(lambda: len(handled) == 18 and len(dead) == 2, what="every message handled or dead-lettered")
        port = bus.probe_port
        assert port
        full = settings.topic(topic)

        async def scraped() -> str:
            return (await anyio.to_thread.run_sync(_get, port, "/metrics"))[1]

        text = await scraped()
        with anyio.fail_after(10):  # the in-flight gauge settles once the last acknowledgement is counted
            while _value(text, "eventbus_messages_in_flight", topic=full, group="g") != 0:
                await anyio.sleep(0.05)
                text = await scraped()
    sub = {"topic": full, "group": "g"}
    assert _value(text, "eventbus_messages_received_total", **sub) == 20
    assert _value(text, "eventbus_messages_handled_total", **sub, outcome="ok") == 18
    assert _value(text, "eventbus_messages_handled_total", **sub, outcome="retried") == 5  # 5, 10, 15, and 7, 14 once
    assert _value(text, "eventbus_messages_handled_total", **sub, outcome="dead_lettered") == 2
    assert _value(text, "eventbus_handler_duration_seconds_count", **sub) == 25, "one per attempt"
    assert _value(text, "eventbus_dead_letter_publishes_total", **sub, result="ok") == 2
    assert _value(text, "eventbus_messages_published_total", topic=full) == 20
    assert _value(text, "eventbus_messages_published_total", topic=dlq) == 2
    assert _value(text, "eventbus_publish_duration_seconds_count", topic=full) >= 1
    assert _value(text, "eventbus_consumer_subscribes_total", **sub) == 1
    assert 'key="' not in text and "message_id" not in text, "no label per key or message"


async def test_received_is_reconciled_with_outcomes_and_what_a_stop_left(settings: Settings, topic: str) -> None:
    # One key, each message its own batch (each publish awaited): at the stop, the running one finishes
    # and the received ones behind it are left for the broker: counted, so the received count adds up.
    router = Router()
    release = asyncio.Event()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def handle(n: int) -> None:
        if n == 0:
            await release.wait()

    observed = settings.model_copy(update={"metrics": True})
    bus = EventBus(observed, routers=[router])
    async with bus:
        for n in range(20):
            await bus.publish(topic, n, key="k")
        assert bus.metrics is not None
        counts = bus.metrics.subscription(settings.topic(topic), "g")
        async with running(bus):
            await eventually(lambda: counts.received == 20, what="all 20 received, 0 running")
            bus.stop()
            release.set()
    text = generate_latest(bus.metrics.registry).decode()
    sub = {"topic": settings.topic(topic), "group": "g"}
    left = _value(text, "eventbus_messages_not_handled_total", **sub, reason="left_at_stop")
    ok = _value(text, "eventbus_messages_handled_total", **sub, outcome="ok")
    assert (ok, left) == (1, 19)
    assert _value(text, "eventbus_messages_received_total", **sub) == ok + left + _value(
        text, "eventbus_messages_not_handled_total", **sub, reason="duplicate"
    )


async def test_readyz_is_up_while_consuming_and_down_from_the_stop(settings: Settings, topic: str) -> None:
    router = Router()
    started = anyio.Event()
    release = threading.Event()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def hold(n: int) -> None:
        started.set()
        await anyio.to_thread.run_sync(release.wait, 30)

    observed = settings.model_copy(update={"metrics_port": 0})
    async with EventBus(observed, routers=[router]) as bus, anyio.create_task_group() as tg:
        await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
        port = bus.probe_port
        assert port
        ready: list[int] = []

        async def probe() -> bool:
            ready.append((await anyio.to_thread.run_sync(_get, port, "/readyz"))[0])
            return ready[-1] == 200

        with anyio.fail_after(20):
            while not await probe():
                await anyio.sleep(0.05)
        await bus.publish(topic, 1)
        await started.wait()
        bus.stop()  # the drain begins: the handler is still running
        assert (await anyio.to_thread.run_sync(_get, port, "/readyz"))[0] == 503
        assert (await anyio.to_thread.run_sync(_get, port, "/livez"))[0] == 200
        release.set()


async def test_livez_fails_while_a_handler_blocks_the_loop(settings: Settings, topic: str) -> None:
    router = Router()
    done: list[int] = []

    @router.subscribe(topic, "g", initial_position="earliest")
    async def blocking(n: int) -> None:
        time.sleep(2.0)  # the mistake under test: a blocking call in a coroutine handler
        done.append(n)

    observed = settings.model_copy(update={"metrics_port": 0, "liveness_stall_seconds": 0.5})
    statuses: list[int] = []
    polling = threading.Event()
    async with EventBus(observed, routers=[router]) as bus, running(bus):
        port = bus.probe_port
        assert port

        def poll() -> None:
            while not polling.is_set():
                statuses.append(_get(port, "/livez")[0])
                polling.wait(0.1)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            await bus.publish(topic, 1)
            await eventually(lambda: done, what="the blocking handler to return")
            await eventually(lambda: statuses and statuses[-1] == 200, what="/livez to recover")
        finally:
            polling.set()
            await anyio.to_thread.run_sync(poller.join)
    assert 503 in statuses, "answered from its own thread while the loop was blocked"


def test_a_metrics_port_in_use_or_invalid_is_one_line_and_exit_2(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {**base_env, "EVENTBUS_DATA_DIR": str(tmp_path / "embedded"), "EVENTBUS_LOG_LEVEL": "WARNING"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli({**env, "EB_TOPIC": "t", "EB_RECORD": str(tmp_path / "r")}, "run", "tests.apps.router_app:router",
                     "--metrics-port", str(port))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot serve metrics on 127.0.0.1:{port} (Address already in use): "
        "set EVENTBUS_METRICS_PORT to a free port"
    ]
    invalid = cli({**env, "EVENTBUS_METRICS_PORT": "70000"}, "publish", "t", "1")
    assert invalid.returncode == 2 and "EVENTBUS_METRICS_PORT" in invalid.stderr
    assert len(invalid.stderr.strip().splitlines()) == 1, invalid.stderr


async def test_json_logs_are_one_object_per_line_with_the_message_fields(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**subprocess_env, "EB_TOPIC": topic, "EVENTBUS_LOG_FORMAT": "json"}
    text = await dead_letter_log(settings, env, "tests.apps.failing", tmp_path / "w.log", {"n": 1}, key="k1")
    ours = [line for line in text.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in ours]  # every line the bus wrote parses
    assert ours and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    (dead,) = [r for r in records if "dead-lettered" in r["message"]]
    assert (dead["topic"], dead["group"], dead["key"], dead["attempt"]) == (settings.topic(topic), "g", "k1", 1)
    assert dead["message_id"].count(":") == 3 and "ValueError: cannot take" in dead["exception"]


class _Runner:
    """A subscription runner whose first subscribe waits for `go` (pure logic: no broker)."""

    ready = True
    in_flight = 0

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        await self.go.wait()

    async def run(self) -> None:
        await self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()

    async def close(self) -> None:
        pass


async def test_readiness_waits_for_every_first_subscribe_and_ends_at_the_stop() -> None:
    from eventbus import Settings
    from eventbus.running.worker import Worker

    runners = [_Runner(), _Runner()]
    settings = Settings(_env_file=None, shutdown_drain_timeout=5)
    worker = Worker(runners, [], bus=None, stop=asyncio.Event(), settings=settings)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: worker.run(handle_signals=False, task_status=anyio.TASK_STATUS_IGNORED))
        runners[0].go.set()
        assert not worker.ready(), "one subscription is not up yet"
        runners[1].go.set()
        await eventually(worker.ready, what="ready once every subscription is up")
        worker.stop()
        assert not worker.ready(), "down from the stop, before the drain ends"


def _half_sent(port: int, count: int) -> list[socket.socket]:
    """`count` connections that send a request line and never finish the headers."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: attacker\r\n")
        sockets.append(s)
    return sockets


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1024) == b""
    except OSError:  # reset: closed too
        return True
    finally:
        s.close()


async def test_slow_and_vanishing_probe_clients_hold_no_thread_for_long_and_print_nothing(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """300 half-sent requests made 311 threads for good; a client's reset printed a traceback to stderr."""
    import struct

    from eventbus.observing import metrics, probes

    monkeypatch.setattr(probes, "CONNECTION_TIMEOUT", 0.5)
    server = probes.Probes(metrics.Metrics(), lambda: True, "127.0.0.1", 0, stall=10)
    peak = [0]
    attacking = threading.Event()

    def handlers() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    def sample() -> None:
        while attacking.is_set():
            peak[0] = max(peak[0], handlers())
            time.sleep(0.005)

    def attack() -> list[bool]:
        sockets = _half_sent(server.port, 300)
        return [_closed_by_server(s) for s in sockets]  # each within the client's 10 s timeout

    def vanish() -> None:
        for s in _half_sent(server.port, 50):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset while the server reads the headers

    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        attacking.set()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            closed = await anyio.to_thread.run_sync(attack)
        finally:
            attacking.clear()
            sampler.join()
        await anyio.to_thread.run_sync(vanish)
        assert (await anyio.to_thread.run_sync(_get, server.port, "/livez"))[0] == 200
        await eventually(lambda: handlers() == 0, what="every connection's thread gone")
        tg.cancel_scope.cancel()
    assert all(closed), f"{closed.count(False)} of 300 connections left open"
    assert 0 < peak[0] <= probes.MAX_CONNECTIONS, peak[0]
    assert capfd.readouterr().err == ""
