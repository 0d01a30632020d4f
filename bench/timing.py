"""How fast a worker goes through a backlog: the helper every consume row of the bench times with."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from eventbus import EventBus, Router, Settings


async def worker_rate(
    settings: Settings, router: Router, n: int, done: anyio.Event, fill: Callable[[], Awaitable[None]], **options: Any
) -> float:
    """Messages per second a worker with `router` handles a backlog of `n` at, from its start (`done` set at the
    last); `fill` writes the backlog once the bus is up and before the worker starts."""
    async with EventBus(settings, routers=[router], **options) as bus:
        await fill()
        async with anyio.create_task_group() as tg:
            start = time.perf_counter()
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            await done.wait()
            rate = n / (time.perf_counter() - start)
            bus.stop()
    return rate
