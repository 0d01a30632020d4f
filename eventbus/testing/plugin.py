"""The pytest plugin: the embedded broker once per session, and each test's app in a namespace of its own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from ..app import resolve
from ..broker.embedded import EmbeddedBroker
from ..registry import Router, default_router
from ..settings import Settings
from .harness import Harness


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "eventbus_app",
        type="args",
        default=[],
        help="eventbus: what the eventbus_app fixture runs, as `eventbus run` takes it "
        "(modules using @subscribe, or module:router); default: the handlers registered by @subscribe",
    )


@pytest.fixture(scope="session")
def eventbus_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded broker, started once per test session with its data in a temporary directory."""
    lease = EmbeddedBroker.acquire(tmp_path_factory.mktemp("eventbus-broker"))
    yield lease
    lease.release()


@pytest.fixture
def eventbus_routers(request: pytest.FixtureRequest) -> list[Router]:
    """The app's routers: the `eventbus_app` ini option's targets, else the `@subscribe` registry (override to choose)."""
    targets = request.config.getini("eventbus_app")
    if not targets:
        return [default_router]
    routers, _ = resolve(targets)
    return routers


@pytest.fixture
def eventbus_settings(eventbus_broker: EmbeddedBroker) -> Settings:
    """Settings on the session's broker, in a namespace of this test's own: short topic names are the test's alone."""
    return Settings(
        _env_file=None,
        url="",
        embedded=True,
        data_dir=eventbus_broker.data_dir,
        namespace=f"test-{uuid.uuid4().hex[:12]}",
        shutdown_drain_timeout=5,
    )


try:
    import pytest_asyncio
except ImportError:  # installing eventbus registers this plugin: without pytest-asyncio, say so where it is needed

    @pytest.fixture(name="eventbus_app")
    def _needs_pytest_asyncio() -> None:
        pytest.fail("the eventbus_app fixture needs pytest-asyncio: pip install 'eventbus[testing]'", pytrace=False)

else:

    @pytest_asyncio.fixture(name="eventbus_app")
    async def _eventbus_app(eventbus_settings: Settings, eventbus_routers: list[Router]) -> AsyncIterator[Harness]:
        """The app's bus, started, with its worker running: publish, then await what the handlers did."""
        async with Harness(eventbus_settings, eventbus_routers) as harness:
            yield harness
