"""Bench rows of effectively-once outputs (Apache Pulsar, `public/dedup`): a worker's `returns_to` with and without it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import anyio

from eventbus import EventBus, Router, Settings

from .timing import worker_rate

Row = dict[str, Any]


async def once_rows(settings: Settings, n: int, raw_consume: float) -> list[Row]:
    """A worker through a backlog of `n` messages, each returned to `returns_to` (concurrency 8), against this run's
    raw receive+decode+ack loop at 100 B."""
    dedup = settings.model_copy(update={"namespace": "dedup", "deduplication": True})
    rows: list[Row] = []
    for kind in ("key_shared", "failover"):
        for once in (False, True):
            rate = await _returns(dedup, n, kind, once)
            label = f"bus worker, returns_to, {kind}, concurrency 8{', effectively once' if once else ''}"
            rows.append({"op": "consume", "path": label, "msg_s": rate, "vs_raw": rate / raw_consume, "size": 100})
    return rows


async def _returns(settings: Settings, n: int, kind: str, once: bool) -> float:
    topic = f"bench-once-{uuid.uuid4().hex[:10]}"
    count = 0
    done = anyio.Event()
    router = Router()

    @router.subscribe(topic, "bench", subscription_type=kind, concurrency=8, initial_position="earliest",  # type: ignore[arg-type]
                      returns_to=f"{topic}-out", effectively_once=once)
    async def handler(item: dict[str, Any]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count == n:
            done.set()
        return item

    async def fill() -> None:
        async with EventBus(settings, routers=[]) as bus:
            for start in range(0, n, 1000):
                seqs = range(start, min(n, start + 1000))
                await asyncio.gather(*(bus.publish(topic, {"seq": i, "pad": "p" * 70}, key=f"k{i % 64}") for i in seqs))

    return await worker_rate(settings, router, n, done, fill)
