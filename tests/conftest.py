from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from eventbus import EventBus, Settings
from eventbus.broker.client import LastEntry
from eventbus.broker.embedded import EmbeddedBroker


pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
#: `cluster` (scripts/pulsar-cluster: three brokers, three bookies) is its own lane: `--brokers cluster`.
BROKERS = ("embedded", "pulsar", "cluster")
DEFAULT_BROKERS = "embedded,pulsar"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--brokers",
        default=os.environ.get("TEST_BROKERS", DEFAULT_BROKERS),
        help="comma-separated brokers to run the integration suite on: embedded, pulsar, cluster "
        f"(default: {DEFAULT_BROKERS})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pulsar: needs real Apache Pulsar (token auth, admin API)")


def selected(config: pytest.Config) -> list[str]:
    return str(config.getoption("--brokers")).split(",")


def _real_pulsar(request: pytest.FixtureRequest, script_name: str, run_dir: Path) -> Iterator[dict]:
    """Start a scripts/ Pulsar unless it runs; its state.json; stopped at the end if started here."""
    script = ROOT / "scripts" / script_name
    status = subprocess.run([sys.executable, str(script), "status"], capture_output=True, text=True)
    started_here = status.returncode != 0
    if started_here:
        result = subprocess.run([sys.executable, str(script), "start"], capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            if os.environ.get("CI"):
                pytest.fail(f"{script_name} did not start in CI: {result.stderr[-3000:]}", pytrace=False)
            pytest.skip(f"{script_name} not available here ({reason}); the embedded broker still ran")
    state = json.loads((run_dir / "state.json").read_text())
    state["script"] = str(script)
    yield state
    if started_here:
        subprocess.run([sys.executable, str(script), "stop"], capture_output=True)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[dict]:
    """An Apache Pulsar cluster (scripts/pulsar-cluster), started once per session: `--brokers cluster`."""
    if "cluster" not in selected(request.config):
        pytest.skip("the Pulsar cluster not selected (--brokers cluster)")
    run_dir = Path(os.environ.get("PULSAR_CLUSTER_RUN_DIR", "/tmp/eventbus-pulsar-cluster"))
    yield from _real_pulsar(request, "pulsar-cluster", run_dir)


@pytest.fixture(scope="session")
def pulsar(request: pytest.FixtureRequest) -> Iterator[dict]:
    """Real Apache Pulsar: the standalone (scripts/pulsar-standalone), or in the cluster lane the cluster.

    Tests written for one real Pulsar take the cluster in its lane (`--brokers cluster`): the state has
    the same shape, its service URL names every broker.
    """
    chosen = selected(request.config)
    if "pulsar" in chosen:
        run_dir = Path(os.environ.get("PULSAR_STANDALONE_RUN_DIR", "/tmp/eventbus-pulsar"))
        yield from _real_pulsar(request, "pulsar-standalone", run_dir)
    elif "cluster" in chosen:
        yield request.getfixturevalue("cluster")
    else:
        pytest.skip("real Apache Pulsar not selected (--brokers)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`broker_kind`: each broker of --brokers, in BROKERS order (one the run did not select is not a test)."""
    if "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", [b for b in BROKERS if b in selected(metafunc.config)])


@pytest.fixture(scope="session")
def broker(eventbus_broker: EmbeddedBroker) -> EmbeddedBroker:
    """The embedded broker, started once for the whole test session (the test kit's: one broker for both)."""
    return eventbus_broker


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest) -> Settings:
    if broker_kind in ("pulsar", "cluster"):
        pulsar = request.getfixturevalue(broker_kind)
        return Settings(
            _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], shutdown_drain_timeout=10
        )
    # The embedded mode itself, joining the session's broker through its data dir.
    broker = request.getfixturevalue("broker")
    return Settings(_env_file=None, data_dir=broker.data_dir, shutdown_drain_timeout=10)


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def base_env() -> dict[str, str]:
    """The environment for a child process, without any eventbus settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTBUS_", "MQ_NAME_SERVER", "PULSAR_JWT"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def subprocess_env(base_env: dict[str, str], settings: Settings, request: pytest.FixtureRequest) -> dict[str, str]:
    """A child process's environment that reaches the same broker as `settings`."""
    env = dict(base_env)
    if settings.uses_embedded:
        env["EVENTBUS_DATA_DIR"] = str(settings.data_dir)
    else:
        env["EVENTBUS_URL"] = settings.url
        env["EVENTBUS_TOKEN"] = settings.jwt() or ""
        # The dlq commands ask the admin API whether a topic exists (a client lookup would create it).
        pulsar = request.getfixturevalue("pulsar")
        env["EVENTBUS_ADMIN_URL"] = admin_urls(pulsar)
        env["EVENTBUS_ADMIN_TOKEN"] = pulsar["admin_token"]
    return env


def admin_urls(pulsar: dict) -> str:
    """EVENTBUS_ADMIN_URL for a real Pulsar: a cluster's every broker, tried in turn."""
    return ",".join(b["web_url"] for b in pulsar["brokers"].values()) if "brokers" in pulsar else pulsar["admin_url"]


@asynccontextmanager
async def running(bus: EventBus) -> AsyncIterator[EventBus]:
    """Run the bus's handlers for the body of the block, then stop and drain."""
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
        try:
            yield bus
        finally:
            bus.stop()


def read_messages(client: Any, topic: str) -> list[Any]:
    """Every message stored on one (non-partitioned) topic, with the raw client, oldest first.

    Read through a fresh shared subscription from the earliest message, until every message of the last
    entry the broker reports (its batch counted) is in, then removed: pulsar-lite's Reader (an exclusive
    subscription there) hands messages over again and stalls (eventbus.broker.profile.reads_by_subscription).
    """
    import pulsar

    name = f"read-stored-{uuid.uuid4().hex[:8]}"
    consumer = client.subscribe(
        topic, name, consumer_type=pulsar.ConsumerType.Shared, initial_position=pulsar.InitialPosition.Earliest,
    )
    try:
        try:
            end = LastEntry(consumer.get_last_message_id())
        except Exception:  # a topic with nothing stored: pulsar-lite answers with an error
            return []
        messages: list[Any] = []
        done = end.empty
        while not done:
            try:
                message = consumer.receive(10_000)
            except pulsar.Timeout:
                raise AssertionError(f"{topic}: nothing came for 10 s before its last entry {end.end}") from None
            messages.append(message)
            # Acknowledged: Apache Pulsar stops sending to a consumer holding 50,000 unacknowledged
            # (maxUnackedMessagesPerConsumer), which stalled a read of a 50,138-message topic there.
            consumer.acknowledge(message)
            # Whole: the client unpacks a batch into its queue one message at a time, so an empty queue after
            # the last entry's first message is not its end (that lost the end of a batch on a busy machine).
            done = end.reached(message)
        return messages
    finally:
        # Closed first, which sends the acknowledgements the client groups (up to 100 ms), then removed by a consumer
        # that sends none: an acknowledgement arriving after the unsubscribe made pulsar-lite drop the connection, and
        # the client's other producers with it (2 of 40 reads, and a CI run's `client.close()` raised NotConnected).
        consumer.close()
        client.subscribe(topic, name, consumer_type=pulsar.ConsumerType.Shared).unsubscribe()


def page_project(page: str) -> dict[str, str]:
    """The files a docs page builds (`docs/tutorial/testing.md`: pyproject.toml, shop.py, test_shop.py), as shown."""
    from .docs_pages import parse

    return parse((ROOT / page).read_text(), ROOT).files


def raw_client(url: str, token: str | None) -> Any:
    import pulsar

    options: dict = {"logger": pulsar.FileLogger(pulsar.LoggerLevel.Error, "/dev/null")}
    if token:
        options["authentication"] = pulsar.AuthenticationToken(token)
    return pulsar.Client(url, **options)


def read_stored(url: str, token: str | None, topic: str, partitions: int = 0) -> dict[bytes, list[tuple[int, ...]]]:
    """Every payload of a topic as the broker stored it: payload -> [(partition, ledger, entry, batch index)]."""
    client = raw_client(url, token)
    names = [topic] if not partitions else [f"{topic}-partition-{i}" for i in range(partitions)]
    stored: dict[bytes, list[tuple[int, ...]]] = {}
    try:
        for partition, name in enumerate(names, 0 if partitions else -1):
            for message in read_messages(client, name):
                mid = message.message_id()
                stored.setdefault(message.data(), []).append((partition, mid.ledger_id(), mid.entry_id(), mid.batch_index()))
    finally:
        client.close()
    return stored


def id_of(message_id: object) -> tuple[int, ...]:
    """A returned id in `read_stored`'s form."""
    mid: Any = message_id
    return (mid.partition(), mid.ledger_id(), mid.entry_id(), mid.batch_index())


async def eventually(check: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it is truthy, failing after `timeout` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not check():
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")
