"""Bench rows with Pulsar's schemas (Apache Pulsar only): a declared model's publishes and a worker reading AVRO records."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import _pulsar
import anyio
import pulsar
from pulsar.schema import AvroSchema, Double, Long, Record, String
from pydantic import BaseModel

from eventbus import EventBus, Router, Settings

from .timing import worker_rate

Row = dict[str, Any]
_TASKS = 1000


class Reading(BaseModel):
    """About 100 bytes as JSON, as the other 100 B rows."""

    sensor: str
    seq: int
    value: float
    pad: str


class ReadingRecord(Record):  # type: ignore[misc]
    """The same fields as a Java or Go service's `Schema.AVRO` class, written by the raw client."""

    _avro_namespace = "bench"
    sensor = String()
    seq = Long()
    value = Double()
    pad = String()


def _reading(i: int) -> Reading:
    return Reading(sensor=f"s{i % 64}", seq=i, value=i / 4, pad="p" * 50)


def _topic() -> str:
    return f"persistent://public/default/bench-schema-{uuid.uuid4().hex[:10]}"


async def schema_rows(
    url: str, settings: Settings, auth: dict[str, Any], n: int, raw: dict[str, float], producing: dict[str, Any]
) -> list[Row]:
    """`raw`: this run's raw publish and consume rates at 100 B, which the rows are compared with; `producing`: the
    options the other rows' backlogs are written with (the AVRO backlog too: batching decides a consumer's rate)."""
    rows = await _publish_rows(settings, n)
    for row in rows:
        row["vs_raw"] = row["msg_s"] / raw["publish"]
    consumed: Row = {"op": "consume", "path": "bus worker, pydantic model, AVRO records, concurrency 1"}
    consumed["msg_s"] = await _consume_avro(url, settings, auth, n, producing)
    consumed["vs_raw"] = consumed["msg_s"] / raw["consume"]
    rows.append(consumed)
    for row in rows:
        row["size"] = 100
    return rows


async def _publish_rows(settings: Settings, n: int) -> list[Row]:
    """A model's publishes from 1,000 tasks, to a topic without a schema and to one it is declared for."""
    rows: list[Row] = []
    readings = [_reading(i) for i in range(n)]
    for label, declared in (("model, no schema", False), ("declared model, JSON schema", True)):
        t = _topic()
        router = Router()
        if declared:
            router.publisher(t, Reading)
        async with EventBus(settings, routers=[router]) as bus:
            await bus.publish(t, readings[0])  # producer (and schema) made outside the timing

            async def task(j: int) -> None:
                for i in range(j, n, _TASKS):
                    await bus.publish(t, readings[i], key=readings[i].sensor)

            start = time.perf_counter()
            await asyncio.gather(*(task(j) for j in range(_TASKS)))
            rate = n / (time.perf_counter() - start)
        rows.append({"op": "publish", "path": f"bus.publish, {_TASKS} tasks awaiting, {label}", "msg_s": rate})
    return rows


async def _consume_avro(url: str, settings: Settings, auth: dict[str, Any], n: int, producing: dict[str, Any]) -> float:
    """A worker's rate through a backlog of `n` AVRO records (Java's `Schema.AVRO`), decoded into the model."""
    t = _topic()
    count = 0
    done = anyio.Event()
    router = Router()

    @router.subscribe(t, "bench", subscription_type="key_shared", initial_position="earliest")
    async def handler(reading: Reading) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    return await worker_rate(settings, router, n, done, lambda: anyio.to_thread.run_sync(_fill_avro, url, auth, t, n, producing))


def _fill_avro(url: str, auth: dict[str, Any], t: str, n: int, producing: dict[str, Any]) -> None:
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **auth)
    producer = client.create_producer(t, schema=AvroSchema(ReadingRecord), **producing)
    for i in range(n):
        r = _reading(i)
        producer.send_async(ReadingRecord(sensor=r.sensor, seq=r.seq, value=r.value, pad=r.pad), None, partition_key=r.sensor)
    producer.flush()
    client.close()
