"""Bad input of every kind: random payloads, broken settings, a broker that went away."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from pydantic import BaseModel

from eventbus import EventBus, Message, PublishError, Router, Settings
from eventbus.broker.embedded import EmbeddedBroker

from .conftest import eventually, running


class Reading(BaseModel):
    sensor: str
    value: float


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
payloads = st.lists(
    st.binary(max_size=64)
    | json_values.map(orjson.dumps)
    | st.builds(lambda s, v: orjson.dumps({"sensor": s, "value": v}), st.text(max_size=10), st.floats(allow_nan=False)),
    min_size=10,
    max_size=40,
)


async def _every_payload_is_handled_or_dead_lettered(settings: Settings, topic: str, kind: Any, batch: list[bytes]) -> None:
    router = Router()
    handled: list[int] = []
    dead: list[tuple[int, str]] = []

    async def handler(value, msg: Message) -> None:  # type: ignore[no-untyped-def]
        handled.append(int(msg.properties["i"]))

    handler.__annotations__["value"] = kind
    router.subscribe(topic, "g", initial_position="earliest", max_retries=0)(handler)

    @router.subscribe(settings.topic(topic) + "-g-DLQ", "reader", initial_position="earliest")
    async def dlq(data: bytes, msg: Message) -> None:
        dead.append((int(msg.properties["i"]), msg.properties["eventbus-error"]))

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        for i, data in enumerate(batch):
            await bus.publish(topic, data, properties={"i": str(i)}, key="one-key")
        await eventually(lambda: len(handled) + len(dead) >= len(batch), what="every payload's outcome")
        await bus.publish(topic, b"", properties={"i": "-1"}, key="one-key")  # a marker: nothing else comes after
        await eventually(lambda: -1 in handled or any(i == -1 for i, _ in dead))
    outcomes = sorted(handled + [i for i, _ in dead])
    assert outcomes == [-1, *range(len(batch))], "each payload exactly once: handled or dead-lettered"
    assert all(reason for _, reason in dead)
    for i, data in enumerate(batch):
        if kind is bytes:
            assert i in handled
        if kind is dict and i in handled:
            assert isinstance(orjson.loads(data), dict)


@pytest.mark.parametrize("kind", [Reading, dict, bytes, str], ids=["model", "dict", "bytes", "str"])
def test_random_payloads_are_handled_or_dead_lettered(settings: Settings, kind: Any) -> None:
    counter = iter(range(10_000))

    @hsettings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=payloads)
    def check(batch: list[bytes]) -> None:
        topic = f"fuzz-{os.getpid()}-{time.monotonic_ns()}-{next(counter)}"
        asyncio.run(_every_payload_is_handled_or_dead_lettered(settings, topic, kind, batch))

    check()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"EVENTBUS_URL": "pulsar://"}, "no host"),
        ({"EVENTBUS_URL": "kafka://broker:9092"}, "scheme 'kafka'"),
        ({"EVENTBUS_URL": "pulsar://b1:6650,pulsar+ssl://b2:6651"}, "mixes schemes"),
        ({"MQ_NAME_SERVER": "b1:6650"}, "no scheme"),
        ({"EVENTBUS_OPERATION_TIMEOUT_SECONDS": "-5"}, "EVENTBUS_OPERATION_TIMEOUT_SECONDS"),
        ({"EVENTBUS_PRODUCER_COMPRESSION": "gzip"}, "EVENTBUS_PRODUCER_COMPRESSION"),
        ({"EVENTBUS_PRODUCER_BATCHING_MAX_MESSAGES": "1"}, "EVENTBUS_PRODUCER_BATCHING_MAX_MESSAGES"),
        ({"EVENTBUS_SHUTDOWN_DRAIN_TIMEOUT": "soon"}, "EVENTBUS_SHUTDOWN_DRAIN_TIMEOUT"),
        ({"EVENTBUS_TOKEN_FILE": "/nonexistent/token.jwt"}, "cannot read token file /nonexistent/token.jwt"),
        ({"EVENTBUS_TOKEN_FILE": "/"}, "cannot read token file /"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(base_env: dict[str, str], tmp_path: Path, env: dict, words: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "publish", "t", "1"],
        env={**base_env, "EVENTBUS_DATA_DIR": str(tmp_path), **env}, capture_output=True, text=True, timeout=60,
    )
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err


async def test_a_publisher_whose_broker_died_gets_an_error_per_publish_within_the_send_timeout(
    tmp_path: Path, topic: str
) -> None:
    lease = EmbeddedBroker.acquire(tmp_path / "doomed")
    settings = Settings(_env_file=None, url=lease.url, producer_send_timeout_ms=2000)
    try:
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 0)
            os.kill(lease.pid, signal.SIGKILL)
            start = time.monotonic()
            results = await asyncio.gather(*(bus.publish(topic, n) for n in range(1, 51)), return_exceptions=True)
            elapsed = time.monotonic() - start
    finally:
        lease.release()
    assert all(isinstance(r, PublishError) for r in results), [r for r in results if not isinstance(r, PublishError)][:3]
    assert "Timeout" in str(results[0]) and "send timeout" in str(results[0])
    assert elapsed < 2.0 + 3.0, f"errors took {elapsed:.1f}s; the send timeout is 2 s"
