"""A data pipeline stage: records are validated; invalid ones go to the dead-letter topic."""

from __future__ import annotations

import logging
from datetime import datetime

from pydantic import BaseModel, Field

from eventbus import subscribe

log = logging.getLogger("handlers.pipeline")

TOPIC = "pipeline.records"

totals: dict[str, float] = {}


class Record(BaseModel):
    source: str
    metric: str
    value: float = Field(ge=0)
    at: datetime


@subscribe(TOPIC, "pipeline-aggregator", max_retries=2, retry_backoff=0.2, initial_position="earliest")
async def aggregate(record: Record) -> None:
    key = f"{record.source}/{record.metric}"
    totals[key] = totals.get(key, 0.0) + record.value
    log.info("%s += %.2f (total %.2f)", key, record.value, totals[key])
