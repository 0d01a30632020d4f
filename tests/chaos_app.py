"""The handler module the chaos run's workers import (see tests/chaos.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from eventbus import Message, subscribe

WORKER = os.environ["CHAOS_WORKER"]
_record = open(Path(os.environ["CHAOS_DIR"]) / f"handled-{WORKER}-{os.getpid()}.log", "a")


class ChaosEvent(BaseModel):
    pub: int
    key: str
    seq: int
    kind: Literal["ok", "transient", "always", "cancelled", "base", "surrogate"]


class Odd(BaseException):
    """Not an Exception: once stopped a whole subscription."""


async def _cancelled() -> None:
    inner = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    inner.cancel()
    await inner


@subscribe(
    os.environ["CHAOS_TOPIC"], "chaos", concurrency=8, max_retries=3, retry_backoff=0.05, retry_backoff_max=0.5,
    initial_position="earliest", subscription_type=os.environ.get("CHAOS_SUBSCRIPTION", "key_shared"),  # type: ignore[arg-type]
)
async def handle(event: ChaosEvent, msg: Message) -> None:
    if event.kind == "always":
        raise RuntimeError("this message always fails")
    if event.kind == "surrogate":
        raise FileNotFoundError("cannot open " + os.fsdecode(b"report-\xff.csv"))
    if msg.attempt == 1 and event.kind == "transient":
        raise RuntimeError("transient failure")
    if msg.attempt == 1 and event.kind == "cancelled":
        await _cancelled()
    if msg.attempt == 1 and event.kind == "base":
        raise Odd("once")
    # Durable before the handler returns, so before the acknowledgement.
    _record.write(f"{time.time_ns()} {event.pub} {event.key} {event.seq} {msg.attempt} {WORKER}\n")
    _record.flush()
    os.fsync(_record.fileno())
