"""A data pipeline stage: records validated and added up in SQLite, in batches; invalid ones go to the dead-letter topic."""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

import anyio
from pydantic import BaseModel, Field

from eventbus import Batch, Depends, EventBus, default_router, subscribe

log = logging.getLogger("handlers.pipeline")

TOPIC = "pipeline.records"


def database_path() -> Path:
    return Path(os.environ.get("PIPELINE_DB", Path(tempfile.gettempdir()) / "eventbus-pipeline.db"))


class Record(BaseModel):
    source: str
    metric: str
    value: float = Field(ge=0)
    at: datetime


async def database() -> AsyncIterator[sqlite3.Connection]:
    """One connection per worker: opened before the first message, closed after the last is acknowledged."""
    db = sqlite3.connect(database_path(), check_same_thread=False)  # used from one thread at a time
    db.execute("create table if not exists totals (key text primary key, total real not null)")
    yield db
    db.close()


Database = Annotated[sqlite3.Connection, Depends(database, scope="app")]


@default_router.lifespan
@asynccontextmanager
async def announce(bus: EventBus) -> AsyncIterator[None]:
    log.info("pipeline: adding records up in %s", database_path())
    yield
    log.info("pipeline: stopped after the drain")


@subscribe(
    TOPIC, "pipeline-aggregator", batch=Batch(max_messages=500, max_wait=0.2), max_retries=2, retry_backoff=0.2,
    initial_position="earliest",
)
async def aggregate(records: list[Record], db: Database) -> None:
    rows = [(f"{r.source}/{r.metric}", r.value) for r in records]

    def add() -> None:
        with db:  # one transaction per batch
            db.executemany(
                "insert into totals values (?, ?) on conflict(key) do update set total = total + excluded.total", rows
            )

    await anyio.to_thread.run_sync(add)  # sqlite3 blocks: never on the event loop
    log.info("added %d record(s)", len(rows))
