from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from eventbus import EventBus, Settings
from eventbus.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded broker, started once for the whole test session."""
    lease = EmbeddedBroker.acquire(tmp_path_factory.mktemp("broker"))
    yield lease
    lease.release()


@pytest.fixture
def settings(broker: EmbeddedBroker) -> Settings:
    # The embedded mode itself, joining the session's broker through its data dir.
    return Settings(_env_file=None, data_dir=broker.data_dir, shutdown_drain_timeout=10)


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def subprocess_env(broker: EmbeddedBroker, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTBUS_", "MQ_NAME_SERVER", "PULSAR_JWT"))}
    env["EVENTBUS_DATA_DIR"] = str(broker.data_dir)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


@asynccontextmanager
async def running(bus: EventBus) -> AsyncIterator[EventBus]:
    """Run the bus's handlers for the body of the block, then stop and drain."""
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
        try:
            yield bus
        finally:
            bus.stop()


async def eventually(check: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it is truthy, failing after `timeout` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not check():
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")
