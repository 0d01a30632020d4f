"""The handler module the chaos run's workers import (see tests/chaos.py)."""

from __future__ import annotations

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
    kind: Literal["ok", "transient", "always"]


@subscribe(
    os.environ["CHAOS_TOPIC"], "chaos", concurrency=8, max_retries=3, retry_backoff=0.05, retry_backoff_max=0.5,
    initial_position="earliest",
)
async def handle(event: ChaosEvent, msg: Message) -> None:
    if event.kind == "always":
        raise RuntimeError("this message always fails")
    if event.kind == "transient" and msg.attempt == 1:
        raise RuntimeError("transient failure")
    # Durable before the handler returns, so before the acknowledgement.
    _record.write(f"{time.time_ns()} {event.pub} {event.key} {event.seq} {msg.attempt} {WORKER}\n")
    _record.flush()
    os.fsync(_record.fileno())
