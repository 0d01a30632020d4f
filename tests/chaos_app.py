"""The handler module the chaos run's workers import (see tests/chaos.py).

With CHAOS_APP set (`--app`) it is built as a service: the handled records go through a file a lifespan
opens before the first message and closes after the drain, a middleware writes them after the handler
returned, a second group (`chaos-batch`) handles the same topic with a batch handler, and the first group's
handler asks a third (`chaos-answer`, on `<topic>-ask`, in the same workers) for an answer with `bus.request`
before it returns: a worker both requests and answers, as a service split into groups does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel

from eventbus import Batch, CallNext, EventBus, Message, Reject, RequestTimeout, Router, default_router

WORKER = os.environ["CHAOS_WORKER"]


def _dump_tasks(signum: int, frame: object) -> None:
    """SIGUSR1: every asyncio task's stack into the work dir (how a worker that does not stop is looked into)."""
    with open(_DIR / f"tasks-{WORKER}-{os.getpid()}.txt", "a") as out:
        for task in asyncio.all_tasks(asyncio.get_running_loop()):
            task.print_stack(file=out)


signal.signal(signal.SIGUSR1, _dump_tasks)
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
    if message.topic.endswith(ASK_TOPIC):
        return result  # the answering group writes its own records
    event = ChaosEvent.model_validate_json(message.data)
    _write("handled", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {message.attempt} {WORKER}\n")
    return result


router = Router(middleware=[record_after_handler]) if APP else default_router
if APP:

    @router.lifespan
    @asynccontextmanager
    async def records(bus: EventBus) -> AsyncIterator[None]:
        for name in ("handled", "batch", "answered", "asked"):
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


class Answer(BaseModel):
    """What the answering group replies: the question's identity, so a reply to another request shows."""

    pub: int
    key: str
    seq: int


#: The topic the first group's handler sends its requests to (the app mode's third group answers them).
ASK_TOPIC = os.environ["CHAOS_TOPIC"] + "-ask"
#: Long enough for a broker restart or a responder's replacement; a timeout is recorded, then the input retried.
ASK_TIMEOUT = 30.0


#: The retry schedule of the groups that publish (the asker's requests, the answerer's replies). A publish fails
#: while the broker restarts and its clients reconnect (up to about 30 s here: 16 s down, the client's doubling
#: backoff): in the app mode the schedule rides that out (0.25 s doubling to 4 s, 10 retries: about 28 s, beside
#: each attempt's own wait), as a service that publishes would; the short one dead-lettered requests in a CI run.
RETRIES: dict[str, Any] = (
    {"max_retries": 10, "retry_backoff": 0.25, "retry_backoff_max": 4.0} if APP
    else {"max_retries": 3, "retry_backoff": 0.05, "retry_backoff_max": 0.5}
)


class Odd(BaseException):
    """Not an Exception: once stopped a whole subscription."""


async def _cancelled() -> None:
    inner = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    inner.cancel()
    await inner


#: `--once`: the first group's handler publishes one output and returns another (to `<topic>-out`), effectively once.
ONCE = bool(os.environ.get("CHAOS_ONCE"))
OUT_TOPIC = os.environ["CHAOS_TOPIC"] + "-out"


@router.subscribe(
    os.environ["CHAOS_TOPIC"], "chaos", concurrency=8, **RETRIES,
    initial_position="earliest", subscription_type=os.environ.get("CHAOS_SUBSCRIPTION", "key_shared"),  # type: ignore[arg-type]
    effectively_once=ONCE, returns_to=OUT_TOPIC if ONCE else None,
)
async def handle(event: ChaosEvent, msg: Message, bus: EventBus) -> dict[str, object] | None:
    if event.kind == "always":
        if APP:  # at once: the app mode's long retry schedule would hold the key for half a minute
            raise Reject("this message always fails")
        raise RuntimeError("this message always fails")
    if event.kind == "surrogate":
        raise FileNotFoundError("cannot open " + os.fsdecode(b"report-\xff.csv"))
    if msg.attempt == 1 and event.kind == "transient":
        raise RuntimeError("transient failure")
    if msg.attempt == 1 and event.kind == "cancelled":
        await _cancelled()
    if msg.attempt == 1 and event.kind == "base":
        raise Odd("once")
    if APP:
        await ask(event, bus)
    else:  # durable before the handler returns, so before the acknowledgement
        # The id last: two handlings under two ids are a message stored twice (a publish resent), not delivered twice.
        _write("handled", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {msg.attempt} {WORKER} {msg.message_id}\n")
    if not ONCE:
        return None
    output = {"pub": event.pub, "key": event.key, "seq": event.seq}
    await bus.publish(OUT_TOPIC, {**output, "part": 1}, key=event.key)
    return {**output, "part": 2}


if APP:

    @router.subscribe(
        os.environ["CHAOS_TOPIC"], "chaos-batch", concurrency=4, initial_position="earliest",
        batch=Batch(max_messages=50, max_wait=0.05), max_retries=3, retry_backoff=0.05,
    )
    async def handle_many(events: list[ChaosEvent], messages: list[Message]) -> None:
        now = time.time_ns()
        _write("batch", "".join(f"{now} {e.pub} {e.key} {e.seq} 1 {WORKER}\n" for e in events))


async def ask(event: ChaosEvent, bus: EventBus) -> None:
    """The app mode's request: its reply must name this event (a reply to another request is recorded as a lie)."""
    _write("asked", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {WORKER}\n")
    try:
        answer = await bus.request(ASK_TOPIC, event, key=event.key, response_type=Answer, timeout=ASK_TIMEOUT)
    except RequestTimeout:
        _write("asked", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {WORKER} timeout\n")
        raise
    if (answer.pub, answer.key, answer.seq) != (event.pub, event.key, event.seq):
        _write("asked", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {WORKER} lie {answer.model_dump_json()}\n")


if APP:

    @router.subscribe(ASK_TOPIC, "chaos-answer", concurrency=8, initial_position="earliest", **RETRIES)
    async def answer(event: ChaosEvent, msg: Message) -> Answer:
        """Fails a transient event's first attempt too; the record is durable before the reply is sent."""
        if msg.attempt == 1 and event.kind == "transient":
            raise RuntimeError("transient failure answering")
        _write("answered", f"{time.time_ns()} {event.pub} {event.key} {event.seq} {msg.attempt} {WORKER} {msg.message_id}\n")
        return Answer(pub=event.pub, key=event.key, seq=event.seq)
