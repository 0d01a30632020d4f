"""A broker restart under a running worker and publisher (last: it restarts the session's Pulsar).

On the cluster lane (`--brokers cluster`) the fault is the topic's owner SIGKILLed and started again:
the topic moves to another broker, and with the default publish deadline no publish fails.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from eventbus import EventBus, PublishError, Settings

from .conftest import eventually
from .test_worker_process import Worker, lines

pytestmark = [pytest.mark.pulsar, pytest.mark.slow]


async def test_worker_and_publisher_reconnect_and_nothing_confirmed_is_lost(
    pulsar: dict, base_env: dict[str, str], topic: str, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {
        **base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"],
        "EB_TOPIC": topic, "EB_RECORD": str(record), "EVENTBUS_METRICS_PORT": str(port),
    }
    readiness: list[int] = []  # /readyz, polled from a thread all along
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    readiness.append(response.status)
            except urllib.error.HTTPError as exc:
                readiness.append(exc.code)
            except OSError:
                pass  # not serving yet
            polling.wait(0.05)

    worker = Worker(env, tmp_path / "worker.log", "tests.apps.recorder")
    confirmed: set[int] = set()
    failed: dict[int, BaseException] = {}
    cluster = "brokers" in pulsar
    # A restarted single broker is the same broker: a publish it did not confirm within 10 s fails, and is counted.
    deadline = {} if cluster else {"producer_send_timeout_ms": 10_000}
    settings = Settings(_env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], **deadline)

    def fault() -> None:
        script = [sys.executable, pulsar["script"]]
        if cluster:
            owner = subprocess.run([*script, "owner", settings.topic(topic)], capture_output=True, text=True)
            assert owner.returncode == 0, owner.stderr
            for step in ("kill", "restart"):
                done = subprocess.run([*script, step, owner.stdout.strip()], capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
        else:
            done = subprocess.run([*script, "restart"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr

    poller = threading.Thread(target=poll)
    try:
        await worker.wait_subscribed()
        poller.start()
        await eventually(lambda: 200 in readiness, what="/readyz up while consuming")
        async with EventBus(settings, routers=[]) as bus:
            stop = anyio.Event()

            async def publish_forever() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        await bus.publish(topic, n, key=f"k{n % 4}")
                        confirmed.add(n)
                    except PublishError as exc:
                        failed[n] = exc
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_forever)
                await eventually(lambda: len(confirmed) >= 50, what="publishing before the restart")
                await anyio.to_thread.run_sync(fault)
                before_restart = readiness.index(200)
                assert 503 in readiness[before_restart:], "/readyz down while the consumer reconnected"
                after = len(confirmed)
                await eventually(lambda: len(confirmed) >= after + 50, timeout=90, what="publishing after the restart")
                stop.set()
        done = lambda: {int(line.split()[1]) for line in lines(record) if line.startswith("done")}  # noqa: E731
        await eventually(lambda: confirmed <= done(), timeout=90, what="every confirmed publish to be handled")
        await eventually(lambda: readiness[-1] == 200, what="/readyz up again")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0, worker.text()[-2000:]
    finally:
        polling.set()
        if poller.is_alive():
            poller.join()
        worker.kill()
    # One subscribe per consumer (the topic's and the group's retry topic's): the client reconnected them by itself.
    assert worker.text().count(f"subscribed {settings.topic(topic)} group") == 1, "reconnected, not restarted"
    assert worker.text().count("subscribed ") == 2
    assert all(isinstance(e, PublishError) for e in failed.values())
    if cluster:
        assert not failed, "a failover surfaced to the publisher"
    print(f"confirmed {len(confirmed)}, failed {len(failed)}, handled {len(done())}")
