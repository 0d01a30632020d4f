"""The handler module the chaos run's workers import (see tests/chaos.py).

With CHAOS_APP set (`--app`) it is built as a service: the handled records go through a file a lifespan
opens before the first message and closes after the drain, a middleware writes them after the handler
returned, and a second group (`chaos-batch`) handles the same topic with a batch handler.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel

from eventbus import Batch, CallNext, EventBus, Message, Router, default_router

WORKER = os.environ["CHAOS_WORKER"]
APP = bool(os.environ.get("CHAOS_APP"))
_DIR = Path(os.environ["CHAOS_DIR"])
#: The app mode's records: the lifespan opens them and closes them after the drain.
_files: dict[str, IO[str]] = {}


def _write(name: str, line: str) -> None:
    """A record, durable before the handler's message is acknowledged (a closed file raises: the attempt fails)."""
    record = _files[name] if APP else _record
    record.write(line)
    record.flush()
    os.fsync(record.fileno())


async def record_after_handler(message: Message, call_next: CallNext) -> Any:
    """The app mode's middleware: the record is written once the handler returned."""
    result = await call_next(message)
    event = ChaosEvent.model_validate_json(message.data)
    _write("handled", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {message.attempt} {WORKER}\n")
    return result


router = Router(middleware=[record_after_handler]) if APP else default_router
if APP:

    @router.lifespan
    @asynccontextmanager
    async def records(bus: EventBus) -> AsyncIterator[None]:
        for name in ("handled", "batch"):
            _files[name] = open(_DIR / f"{name}-{WORKER}-{os.getpid()}.log", "a")
        yield
        for record in _files.values():
            record.close()  # a handler after this would fail, and its message be dead-lettered
else:
    _record = open(_DIR / f"handled-{WORKER}-{os.getpid()}.log", "a")


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


@router.subscribe(
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
    if not APP:  # durable before the handler returns, so before the acknowledgement
        # The id last: two handlings under two ids are a message stored twice (a publish resent), not delivered twice.
        _write("handled", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {msg.attempt} {WORKER} {msg.message_id}\n")


if APP:

    @router.subscribe(
        os.environ["CHAOS_TOPIC"], "chaos-batch", concurrency=4, initial_position="earliest",
        batch=Batch(max_messages=50, max_wait=0.05), max_retries=3, retry_backoff=0.05,
    )
    async def handle_many(events: list[ChaosEvent], messages: list[Message]) -> None:
        now = time.time_ns()
        _write("batch", "".join(f"{now} {e.pub} {e.key} {e.seq} 1 {WORKER}\n" for e in events))
