"""A broker restart under a running worker and publisher (last: it restarts the session's Pulsar)."""

from __future__ import annotations

import signal
import subprocess
import sys
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
    env = {
        **base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"],
        "EB_TOPIC": topic, "EB_RECORD": str(record),
    }
    worker = Worker(env, tmp_path / "worker.log", "tests.apps.recorder")
    confirmed: set[int] = set()
    failed: dict[int, BaseException] = {}
    settings = Settings(
        _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], producer_send_timeout_ms=10_000
    )
    try:
        await worker.wait_subscribed()
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
                restart = await anyio.to_thread.run_sync(
                    lambda: subprocess.run([sys.executable, pulsar["script"], "restart"], capture_output=True, text=True)
                )
                assert restart.returncode == 0, restart.stderr
                after = len(confirmed)
                await eventually(lambda: len(confirmed) >= after + 50, timeout=90, what="publishing after the restart")
                stop.set()
        done = lambda: {int(line.split()[1]) for line in lines(record) if line.startswith("done")}  # noqa: E731
        await eventually(lambda: confirmed <= done(), timeout=90, what="every confirmed publish to be handled")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0, worker.text()[-2000:]
    finally:
        worker.kill()
    assert worker.text().count("subscribed") == 1, "the worker reconnected by itself, not by restarting"
    assert all(isinstance(e, PublishError) for e in failed.values())
    print(f"confirmed {len(confirmed)}, failed {len(failed)}, handled {len(done())}")
