"""A worker's cost follows its traffic: subscriptions that wait for messages hold no thread each."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from eventbus import EventBus, Settings

from .conftest import eventually
from .test_supervisor import answers, free_port_pair
from .test_worker_process import Worker

pytestmark = pytest.mark.slow


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


async def _worker_threads(settings: Settings, env: dict[str, str], prefix: str, count: int, tmp: Path) -> tuple[int, int]:
    """OS threads of a worker of `count` subscriptions once every one is consuming, and after one message each."""
    record, port = tmp / f"record-{count}.txt", free_port_pair()
    worker = Worker(
        {**env, "EB_TOPIC": f"{prefix}-{count}", "EB_COUNT": str(count), "EB_RECORD": str(record),
         "EVENTBUS_METRICS_PORT": str(port)},
        tmp / f"w-{count}.log", "tests.apps.many:router",
    )
    try:
        await eventually(lambda: worker.proc.poll() is not None or answers(port, "/readyz"), timeout=60, what="every subscription")
        assert worker.proc.poll() is None, worker.text()
        idle = _threads(worker.proc.pid)
        async with EventBus(settings, routers=[]) as bus:
            for i in range(count):
                await bus.publish(f"{prefix}-{count}-{i}", i)
        await eventually(lambda: record.exists() and len(record.read_text().splitlines()) == count, timeout=60,
                         what="one message handled on each")
        return idle, _threads(worker.proc.pid)
    finally:
        worker.proc.terminate()
        await anyio.to_thread.run_sync(worker.proc.wait)
        worker.out.close()


async def test_the_threads_of_a_worker_stay_flat_as_its_subscriptions_grow(
    settings: Settings, subprocess_env: dict[str, str], topic: str, tmp_path: Path
) -> None:
    """Before: two threads per subscription (its topic's and its retry topic's receive, each blocking 100 ms at a
    time): 5 subscriptions held 15 threads, 60 held 125."""
    few = await _worker_threads(settings, subprocess_env, topic, 5, tmp_path)
    many = await _worker_threads(settings, subprocess_env, topic, 60, tmp_path)
    # On Apache Pulsar a subscription asks the schema registry once, through asyncio's default executor: a pool that
    # grows with how many asks overlap, up to min(32, cores + 4), and is then shared by any number of subscriptions.
    # How far it grows is timing (how many asks overlapped), not a thread per subscription.
    pool = min(32, (os.cpu_count() or 1) + 4) if settings.url else 0
    assert max(many) <= max(few) + pool + 2, (few, many)  # the client's and the probe server's own, whatever the count
    assert max(few) <= 16 + pool, few
