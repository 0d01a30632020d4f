"""Throughput and latency of the bus side by side with the raw pulsar-client, in one run.

    python -m bench                      # embedded broker, 100 B and 10 KB payloads
    python -m bench --pulsar             # the real Pulsar of scripts/pulsar-standalone (start it first)
    python -m bench --cluster --only-workers   # --workers N on scripts/pulsar-cluster's three brokers
    python -m bench --url pulsar://... --token ...
    python -m bench --messages 20000 --json bench/results.json

Only ratios between rows of one run mean much: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import _pulsar
import anyio
import pulsar
import pulsar.asyncio
from pydantic import BaseModel

from eventbus import Batch, CallNext, Depends, EventBus, Message, Router, Settings

from . import defaults, once, plot, schemas
from .idle import idle_row, print_idle
from .timing import worker_rate

Row = dict[str, Any]
AUTH: dict[str, Any] = {}  # authentication for the raw clients, when the broker wants a token


def payload(size: int) -> dict[str, Any]:
    body = {"id": "x", "seq": 0, "at": 0.0, "pad": ""}
    base = len(json.dumps(body, separators=(",", ":")))
    body["pad"] = "p" * max(0, size - base)
    return body


class Event(BaseModel):
    id: str
    seq: int
    at: float
    pad: str


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def producer_options(settings: Settings) -> dict[str, Any]:
    return dict(
        batching_enabled=True,
        batching_type=pulsar.BatchingType.KeyBased,
        batching_max_messages=settings.producer_batching_max_messages,
        batching_max_allowed_size_in_bytes=settings.producer_batching_max_bytes,
        batching_max_publish_delay_ms=settings.producer_batching_max_delay_ms,
        compression_type=pulsar.CompressionType.LZ4,
        block_if_queue_full=True,
        max_pending_messages=settings.producer_max_pending_messages,
    )


def tracer_provider() -> Any:
    """An OpenTelemetry SDK provider that exports to nowhere: the cost of making the spans."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Nowhere(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Nowhere()))
    return provider


def topic() -> str:
    return f"persistent://public/default/bench-{uuid.uuid4().hex[:10]}"


async def timed(n: int, fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return n / (time.perf_counter() - start)


async def publish_rows(url: str, settings: Settings, n: int, size: int) -> list[Row]:
    data = json.dumps(payload(size)).encode()
    rows: list[Row] = []
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **AUTH)

    def raw() -> None:
        p = client.create_producer(topic(), **producer_options(settings))
        for i in range(n):
            p.send_async(data, None, partition_key=f"k{i % 64}")
        p.flush()
        p.close()

    start = time.perf_counter()
    await anyio.to_thread.run_sync(raw)
    raw_rate = n / (time.perf_counter() - start)
    rows.append({"op": "publish", "path": "raw send_async, fire-and-forget (limit)", "msg_s": raw_rate})
    client.close()

    aclient = pulsar.asyncio.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **AUTH)
    opts = producer_options(settings)
    opts.pop("block_if_queue_full")
    ap = await aclient.create_producer(topic(), **opts)

    # The shape of an app under load: many tasks (requests, handlers), each
    # awaiting its publish before it goes on.
    tasks = 1000

    async def in_tasks(send: Callable[[int], Awaitable[object]]) -> None:
        async def task(j: int) -> None:
            for i in range(j, n, tasks):
                await send(i)

        await asyncio.gather(*(task(j) for j in range(tasks)))

    rows.append({
        "op": "publish", "path": f"pulsar.asyncio send, {tasks} tasks awaiting",
        "msg_s": await timed(n, lambda: in_tasks(lambda i: ap.send(data, partition_key=f"k{i % 64}"))),
    })
    await ap.close()
    await aclient.close()

    body = payload(size)
    async with EventBus(settings, routers=[]) as bus:
        t = topic()
        await bus.publish(t, body)  # producer created outside the timing

        rows.append({
            "op": "publish", "path": f"bus.publish, {tasks} tasks awaiting, each confirmed",
            "msg_s": await timed(n, lambda: in_tasks(lambda i: bus.publish(t, body, key=f"k{i % 64}"))),
        })
    for extra, options in (("metrics on", {}), ("tracing on", {"tracer_provider": tracer_provider()})):
        metrics = settings.model_copy(update={"metrics": extra == "metrics on"})
        async with EventBus(metrics, routers=[], **options) as measured:
            t = topic()
            await measured.publish(t, body)
            rows.append({
                "op": "publish", "path": f"bus.publish, {tasks} tasks awaiting, each confirmed, {extra}",
                "msg_s": await timed(n, lambda: in_tasks(lambda i: measured.publish(t, body, key=f"k{i % 64}"))),
            })
    async with EventBus(settings, routers=[]) as bus:
        t = topic()
        await bus.publish(t, body)

        async def bus_gather() -> None:
            window = 1000
            for start in range(0, n, window):
                await asyncio.gather(*(bus.publish(t, body, key=f"k{i % 64}") for i in range(start, min(n, start + window))))

        rows.append({"op": "publish", "path": "bus.publish, gather of 1000 at a time", "msg_s": await timed(n, bus_gather)})

        async def bus_batch() -> None:
            chunk = 1000
            for start in range(0, n, chunk):
                await bus.publish_batch(t, [body] * min(chunk, n - start))

        rows.append({"op": "publish", "path": "bus.publish_batch, 1000 a call", "msg_s": await timed(n, bus_batch)})
    for row in rows:
        row["size"] = size
        row["vs_raw"] = row["msg_s"] / raw_rate
    return rows


async def fill(url: str, settings: Settings, t: str, n: int, size: int) -> None:
    data = json.dumps(payload(size)).encode()

    def run() -> None:
        client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **AUTH)
        p = client.create_producer(t, **producer_options(settings))
        for i in range(n):
            p.send_async(data, None, partition_key=f"k{i % 64}", properties={"content-type": "application/json"})
        p.flush()
        client.close()

    await anyio.to_thread.run_sync(run)


async def consume_rows(url: str, settings: Settings, n: int, size: int) -> list[Row]:
    rows: list[Row] = []
    log = pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error)

    # Every row subscribes after the backlog is written and counts from the subscribe: a
    # subscription that existed during the writes reads it from the broker's cache, one made
    # afterwards from storage (5x slower for 10 KB payloads on Apache Pulsar), as a worker
    # starting on a backlog does.

    # Raw blocking receive + acknowledge (the limit).
    t = topic()
    await fill(url, settings, t, n, size)
    client = pulsar.Client(url, logger=log, **AUTH)

    # The raw loops decode into the same pydantic model as the worker's model rows, as a hand-written loop would.
    def raw() -> float:
        start = time.perf_counter()
        c = client.subscribe(t, "bench", consumer_type=pulsar.ConsumerType.Shared, initial_position=pulsar.InitialPosition.Earliest)
        for _ in range(n):
            m = c.receive(10_000)
            Event.model_validate_json(m.data())
            c.acknowledge(m)
        return n / (time.perf_counter() - start)

    raw_rate = await anyio.to_thread.run_sync(raw)
    rows.append({"op": "consume", "path": "raw blocking receive+decode+ack (limit)", "msg_s": raw_rate})

    # What the broker delivers at most: receive alone, no decode, no ack. No consumer, whatever its
    # client-side cost, goes faster; on Apache Pulsar here it is 2.4-3.0 x pulsar.asyncio's loop.
    t = topic()
    await fill(url, settings, t, n, size)

    def receive_only() -> float:
        start = time.perf_counter()
        c = client.subscribe(t, "bench", consumer_type=pulsar.ConsumerType.Shared, initial_position=pulsar.InitialPosition.Earliest)
        for _ in range(n):
            c.receive(10_000)
        return n / (time.perf_counter() - start)

    rows.append({"op": "consume", "path": "raw receive only, no decode, no ack (ceiling)", "msg_s": await anyio.to_thread.run_sync(receive_only)})
    client.close()

    t = topic()
    await fill(url, settings, t, n, size)
    aclient = pulsar.asyncio.Client(url, logger=log, **AUTH)

    async def asyncio_consume() -> None:
        ac = await aclient.subscribe(t, "bench", consumer_type=pulsar.ConsumerType.Shared, initial_position=pulsar.InitialPosition.Earliest)
        for _ in range(n):
            m = await ac.receive()
            Event.model_validate_json(m.data())
            await ac.acknowledge(m)

    rows.append({"op": "consume", "path": "pulsar.asyncio receive+decode+ack", "msg_s": await timed(n, asyncio_consume)})
    await aclient.close()

    variants = [(kind, annotation, c, "") for kind, annotation in (("dict", dict), ("pydantic model", Event)) for c in (1, 64)]
    for kind, annotation, concurrency, extra in [*variants, ("dict", dict, 1, "metrics on"), ("dict", dict, 1, "tracing on")]:
        t = topic()
        router = Router()
        count = 0
        done = anyio.Event()

        async def handler(body, _n=n) -> None:  # type: ignore[no-untyped-def]
            nonlocal count
            count += 1
            if count == _n:
                done.set()

        handler.__annotations__["body"] = annotation
        router.subscribe(t, "bench", subscription_type="key_shared", concurrency=concurrency, initial_position="earliest")(handler)
        options = {"tracer_provider": tracer_provider()} if extra == "tracing on" else {}
        measured_settings = settings.model_copy(update={"metrics": extra == "metrics on"})
        rate = await _consume_with(url, measured_settings, n, router, t, done, size, **options)
        rows.append({
            "op": "consume",
            "path": f"bus worker, {kind}, no-op handler, concurrency {concurrency}{', ' + extra if extra else ''}",
            "msg_s": rate, "rss_mb": rss_mb(),
        })
    for row in rows:
        row["size"] = size
        row["vs_raw"] = row["msg_s"] / raw_rate
    return rows


async def _consume_with(
    url: str, settings: Settings, n: int, router: Router, t: str, done: anyio.Event, size: int = 100, **options: Any
) -> float:
    """Messages per second a worker with `router` handles a backlog of `n` at, from its start (`done` set at the last)."""
    return await worker_rate(settings, router, n, done, lambda: fill(url, settings, t, n, size), **options)


async def app_db() -> AsyncIterator[dict[str, int]]:
    """An app-scoped resource (the handlers' annotations are read at module level: no local providers)."""
    yield {"rows": 0}


async def passthrough(message: Message, call_next: CallNext) -> Any:
    return await call_next(message)


async def service_rows(url: str, settings: Settings, n: int, raw_rate: float) -> list[Row]:
    """The service features' costs: an app-scoped dependency, one middleware, a batch handler, request/reply."""
    rows: list[Row] = []
    for label, middleware, batch in (
        ("an app-scoped dependency", [], None), ("one middleware", [passthrough], None),
        ("a batch handler, batches of up to 500, shared", [], Batch(500, 0.05)),
    ):
        t, counted, done = topic(), [0], anyio.Event()
        router = Router(middleware=middleware)
        if batch is None:

            async def one(body: dict, db: Annotated[dict[str, int], Depends(app_db, scope="app")], _n: int = n) -> None:
                counted[0] += 1
                if counted[0] == _n:
                    done.set()

            router.subscribe(t, "bench", initial_position="earliest")(one)
        else:

            async def many(bodies: list[dict], _n: int = n) -> None:
                counted[0] += len(bodies)
                if counted[0] >= _n:
                    done.set()

            router.subscribe(t, "bench", subscription_type="shared", initial_position="earliest", batch=batch)(many)
        rate = await _consume_with(url, settings, n, router, t, done)
        rows.append({"op": "consume", "path": f"bus worker, dict, {label}", "msg_s": rate, "vs_raw": rate / raw_rate})
    rows.append(await request_row(settings, 2000))
    raw_trip = await raw_round_trip_row(url, settings, 500)
    one = await request_row(settings, 500, tasks=1)
    one["vs_raw"] = raw_trip["p50_ms"] / one["p50_ms"]  # latency: above 1 is faster than the raw round trip
    rows += [raw_trip, one]
    for row in rows:
        row["size"] = 100
    return rows


async def raw_round_trip_row(url: str, settings: Settings, n: int) -> Row:
    """Two raw publish-to-receive hops, one at a time (a raw responder thread sends each request back on another
    topic): the bar for `bus.request` at one in flight. The producers are the bus's (`producer_options`)."""
    asks, answers = topic(), topic()
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **AUTH)
    options = producer_options(settings)
    request_in = client.subscribe(asks, "bench", consumer_type=pulsar.ConsumerType.Exclusive)
    reply_in = client.subscribe(answers, "bench", consumer_type=pulsar.ConsumerType.Exclusive)
    request_out, reply_out = client.create_producer(asks, **options), client.create_producer(answers, **options)

    def respond() -> None:
        for _ in range(n):
            m = request_in.receive(30_000)
            reply_out.send_async(m.data(), None, properties={"correlation": m.data().decode()})
            request_in.acknowledge(m)

    def ask() -> list[float]:
        lat = []
        for i in range(n):
            started = time.perf_counter()
            request_out.send_async(str(i).encode(), None, partition_key=f"k{i % 64}")
            m = reply_in.receive(30_000)
            reply_in.acknowledge(m)
            lat.append(time.perf_counter() - started)
        return lat

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, respond)
        lat = await anyio.to_thread.run_sync(ask)
    client.close()
    q = statistics.quantiles(sorted(lat), n=100)
    return {
        "op": "request", "path": "raw client: two publish->receive hops, 1 in flight", "msg_s": n / sum(lat),
        "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
    }


async def request_row(settings: Settings, n: int, tasks: int = 50) -> Row:
    """Request/reply round trips per second from `tasks` tasks, and each one's latency."""
    t = topic()
    router = Router()

    @router.subscribe(t, "bench", concurrency=8, initial_position="earliest")
    async def answer(body: dict) -> dict:
        return body

    latencies: list[float] = []
    async with EventBus(settings, routers=[router]) as responder, anyio.create_task_group() as tg:
        await tg.start(lambda task_status: responder.run(handle_signals=False, task_status=task_status))
        async with EventBus(settings, routers=[]) as requester:
            await requester.request(t, {"warm": True}, timeout=30)

            async def ask(j: int) -> None:
                for i in range(j, n, tasks):
                    started = time.perf_counter()
                    await requester.request(t, {"i": i}, key=f"k{i % 64}", timeout=30)
                    latencies.append(time.perf_counter() - started)

            start = time.perf_counter()
            await asyncio.gather(*(ask(j) for j in range(tasks)))
            rate = n / (time.perf_counter() - start)
        responder.stop()
    q = statistics.quantiles(sorted(latencies), n=100)
    return {
        "op": "request", "path": f"bus.request round trips, {tasks} task{'s' if tasks > 1 else ''}", "msg_s": rate,
        "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
    }


def _paced_publisher(url: str, token: str, t: str, rate: float, n: int) -> None:
    """Publish n messages at `rate`, stamped with the wall clock; runs in a process of its own."""

    async def main() -> None:
        settings = Settings(_env_file=None, url=url, token=token or None)
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(t, {"id": "warm-up", "seq": -1, "at": time.time()})
            start = time.time() + 0.2
            tasks = 1000

            async def task(j: int) -> None:
                for i in range(j, n, tasks):
                    delay = start + i / rate - time.time()
                    if delay > 0:
                        await anyio.sleep(delay)
                    await bus.publish(t, {"id": "x", "seq": i, "at": time.time()}, key=f"k{i % 64}")

            await asyncio.gather(*(task(j) for j in range(tasks)))

    asyncio.run(main())
    os._exit(0)  # skip the client's teardown race, as __main__ does


async def latency_rows(url: str, settings: Settings, rate: float, seconds: float, label: str = "") -> list[Row]:
    """Publisher and worker in two processes, as they run in production; wall-clock stamps."""
    t = topic()
    router = Router()
    lat: list[float] = []

    @router.subscribe(t, "bench", initial_position="earliest", concurrency=8)
    async def handler(body: dict) -> None:
        if body["seq"] >= 0:
            lat.append(time.time() - body["at"])

    n = int(rate * seconds)
    token = settings.jwt() or ""
    async with EventBus(settings, routers=[router]) as bus:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
            proc = multiprocessing.get_context("spawn").Process(target=_paced_publisher, args=(url, token, t, rate, n))
            proc.start()
            deadline = time.time() + seconds + 60
            while len(lat) < n and time.time() < deadline:
                await anyio.sleep(0.05)
            bus.stop()
            await anyio.to_thread.run_sync(proc.join, 30)
    q = statistics.quantiles(sorted(lat), n=1000)
    return [{
        "op": "latency", "path": f"publish->handler at {label or f'{rate:.0f} msg/s'}", "size": 100, "rate": rate,
        "p50_ms": q[499] * 1000, "p99_ms": q[989] * 1000, "p999_ms": q[998] * 1000, "count": len(lat),
    }]


def _raw_paced_publisher(url: str, token: str, t: str, rate: float, n: int) -> None:
    """The raw client's own paced publisher (send_async, batching as the bus's), in a process of its own."""
    auth = {"authentication": pulsar.AuthenticationToken(token)} if token else {}
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **auth)
    producer = client.create_producer(t, **producer_options(Settings(_env_file=None)))
    start = time.time() + 0.2
    for i in range(n):
        delay = start + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        producer.send_async(json.dumps({"id": "x", "seq": i, "at": time.time()}).encode(), None, partition_key=f"k{i % 64}")
    producer.flush()
    os._exit(0)


async def raw_latency_row(url: str, settings: Settings, rate: float, seconds: float) -> Row:
    """Publish -> receive latency of the raw client alone (blocking receive loop, acknowledging), the bar for the bus's."""
    t = topic()
    n = int(rate * seconds)
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **AUTH)
    consumer = client.subscribe(t, "bench", consumer_type=pulsar.ConsumerType.KeyShared, initial_position=pulsar.InitialPosition.Earliest)
    proc = multiprocessing.get_context("spawn").Process(target=_raw_paced_publisher, args=(url, settings.jwt() or "", t, rate, n))
    proc.start()

    def receive() -> list[float]:
        lat = []
        while len(lat) < n:
            try:
                m = consumer.receive(30_000)
            except Exception:
                break
            lat.append(time.time() - json.loads(m.data())["at"])
            consumer.acknowledge(m)
        return lat

    lat = await anyio.to_thread.run_sync(receive)
    await anyio.to_thread.run_sync(proc.join, 30)
    client.close()
    q = statistics.quantiles(sorted(lat), n=1000)
    return {
        "op": "latency", "path": f"raw client: publish->receive at {rate:.0f} msg/s", "size": 100, "rate": rate,
        "p50_ms": q[499] * 1000, "p99_ms": q[989] * 1000, "p999_ms": q[998] * 1000, "count": len(lat),
    }


async def workers_rows(url: str, settings: Settings, n: int, counts: tuple[int, ...] = (1, 2)) -> list[Row]:
    """Consume a backlog with `eventbus run --workers N` (separate processes, key_shared), timed from the first handled."""
    rows: list[Row] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env.update(EVENTBUS_URL=url, EVENTBUS_TOKEN=settings.jwt() or "", PYTHONPATH=str(Path(__file__).parent.parent))
    for count in counts:
        t = topic()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "handled"
            out.touch()
            await fill(url, settings, t, n, 100)
            command = [sys.executable, "-m", "eventbus", "run", "bench.workers_app"]
            if count > 1:
                command += ["--workers", str(count)]
            proc = await asyncio.create_subprocess_exec(
                *command, env={**env, "EB_BENCH_TOPIC": t, "EB_BENCH_FILE": str(out)},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            while out.stat().st_size == 0:
                await asyncio.sleep(0.005)
            start, first = time.perf_counter(), out.stat().st_size
            while (size := out.stat().st_size) < n:
                await asyncio.sleep(0.005)
            rate = (size - first) / (time.perf_counter() - start)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        rows.append({"op": "consume", "path": f"eventbus run --workers {count}, dict, no-op (vs --workers 1)",
                     "msg_s": rate, "size": 100})
    for row in rows:
        row["vs_raw"] = row["msg_s"] / rows[0]["msg_s"]
    return rows


def medians(runs: list[list[Row]]) -> list[Row]:
    """One row per path: the median of each number over the runs, and the spread (min-max) of `vs_raw`."""
    out = []
    for first in runs[0]:
        same = [row for rows in runs for row in rows if (row["op"], row["size"], row["path"]) == (first["op"], first["size"], first["path"])]
        merged = dict(first)
        for name, value in first.items():
            if isinstance(value, (int, float)) and name != "size":
                merged[name] = statistics.median(row[name] for row in same)
        if "vs_raw" in first:
            merged["spread"] = (min(row["vs_raw"] for row in same), max(row["vs_raw"] for row in same))
        merged["runs"] = len(same)
        out.append(merged)
    return out


def print_table(rows: list[Row], broker: str) -> None:
    print(f"\nbroker: {broker}")
    print(f"{'op':8} {'size':>6}  {'path':62} {'msg/s':>10} {'vs raw':>7}  extra")
    for r in rows:
        if r["op"] == "latency":
            extra = f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  p99.9 {r['p999_ms']:.2f} ms  (n={r['count']})"
            print(f"{r['op']:8} {r['size']:>6}  {r['path']:62} {'':>10} {'':>7}  {extra}")
        elif r["op"] == "request":
            extra = f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
            ratio = f"{r['vs_raw']:>7.2f}" if "vs_raw" in r else f"{'':>7}"
            print(f"{r['op']:8} {r['size']:>6}  {r['path']:62} {r['msg_s']:>10,.0f} {ratio}  {extra}")
        else:
            extra = f"peak RSS {r['rss_mb']:.0f} MB " if "rss_mb" in r else ""
            if r.get("runs", 1) > 1:
                extra += f"vs raw {r['spread'][0]:.2f}-{r['spread'][1]:.2f} over {r['runs']} runs"
            print(f"{r['op']:8} {r['size']:>6}  {r['path']:62} {r['msg_s']:>10,.0f} {r['vs_raw']:>7.2f}  {extra}")


async def amain(args: argparse.Namespace) -> None:
    state: dict[str, Any] = {}
    if args.pulsar or args.cluster:
        run_dir = "/tmp/eventbus-pulsar-cluster" if args.cluster else "/tmp/eventbus-pulsar"
        state = json.loads(Path(run_dir, "state.json").read_text())
        args.url, args.token = state["service_url"], state["client_token"]
    if args.token:
        AUTH["authentication"] = pulsar.AuthenticationToken(args.token)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, url=args.url or "", token=args.token or None, data_dir=Path(tmp))
        async with EventBus(settings, routers=[]) as holder:  # keeps one broker up for the run
            url = holder.url
            broker = f"embedded ({holder.server_version})" if settings.uses_embedded else f"{holder.server_version} at {url}"
            if args.defaults:
                admin = (state["admin_url"], state["admin_token"]) if args.pulsar or args.cluster else None
                rows = [
                    await asyncio.to_thread(defaults.one, url, AUTH, admin, size, compression, delay, args.messages, 2.0)
                    for size in args.sizes for compression, delay in defaults.GRID
                ]
                defaults.print_defaults(rows, broker)
                return
            if args.subscriptions:
                print_idle([await idle_row(url, settings, count) for count in args.subscriptions], broker)
                return
            runs = [await one_run(args, url, settings) for _ in range(args.runs)]
    rows = medians(runs) if args.runs > 1 else runs[0]
    print_table(rows, broker)
    if args.json:
        meta = {"broker": broker, "python": platform.python_version(), "pulsar_client": pulsar.__version__ if hasattr(pulsar, "__version__") else "", "date": time.strftime("%Y-%m-%d"), "runs": runs}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.plot:
        _draw([{"meta": {"broker": broker, "date": time.strftime("%Y-%m-%d")}, "rows": rows}], args.plot)


def _draw(results: list[dict[str, Any]], where: str) -> None:
    """The charts of `results` in the folder `where`, each file's path printed."""
    for path in plot.plot(results, Path(where)):
        print(path)


async def one_run(args: argparse.Namespace, url: str, settings: Settings) -> list[Row]:
    rows: list[Row] = []
    if args.only_workers:
        rows += await workers_rows(url, settings, args.workers_messages or 4 * args.messages)
        args.sizes, args.latency_seconds = [], 0
    for size in args.sizes:
        rows += await publish_rows(url, settings, args.messages, size)
        rows += await consume_rows(url, settings, args.messages, size)
        if size == 100 and not args.no_service:
            raw = next(r["msg_s"] for r in rows if r["path"].startswith("raw blocking") and r["size"] == 100)
            rows += await service_rows(url, settings, args.messages, raw)
        if size == 100 and not settings.uses_embedded and not args.no_schemas:  # pulsar-lite has no registry
            raw_rates = {op: next(r["msg_s"] for r in rows if r["op"] == op and r["path"].startswith("raw ") and r["size"] == 100)
                         for op in ("publish", "consume")}
            rows += await schemas.schema_rows(url, settings, AUTH, args.messages, raw_rates, producer_options(settings))
        if size == 100 and not settings.uses_embedded and not args.no_once:  # pulsar-lite does not deduplicate
            raw_consume = next(r["msg_s"] for r in rows if r["path"].startswith("raw blocking") and r["size"] == 100)
            rows += await once.once_rows(settings, args.messages, raw_consume)
    if args.latency_seconds:
        rows.append(await raw_latency_row(url, settings, 1000, args.latency_seconds))
        rows += await latency_rows(url, settings, 1000, args.latency_seconds)
        pub = max(r["msg_s"] for r in rows if r["path"].startswith("bus.publish,"))
        rows += await latency_rows(url, settings, 0.8 * pub, args.latency_seconds, "0.8 x bus.publish's rate")
    if not settings.uses_embedded and not args.only_workers and not args.no_workers:  # the embedded broker runs one consumer per subscription
        rows += await workers_rows(url, settings, args.workers_messages or 4 * args.messages)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="", help="broker URL (default: the embedded broker)")
    parser.add_argument("--token", default="", help="JWT for --url")
    parser.add_argument("--pulsar", action="store_true", help="the broker scripts/pulsar-standalone started")
    parser.add_argument("--cluster", action="store_true", help="the cluster scripts/pulsar-cluster started")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_240])
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--json", default="")
    parser.add_argument("--runs", type=int, default=1, help="repeat every row; print medians and the spread of vs raw")
    parser.add_argument("--workers-messages", type=int, default=0, help="backlog for the --workers rows (default 4x --messages)")
    parser.add_argument("--only-workers", action="store_true", help="only the --workers rows (Apache Pulsar)")
    parser.add_argument("--no-workers", action="store_true", help="without the --workers rows")
    parser.add_argument("--no-service", action="store_true", help="without the service rows (dependency, middleware, batch, request)")
    parser.add_argument("--no-schemas", action="store_true", help="without the schema rows (Apache Pulsar: declared model, AVRO)")
    parser.add_argument("--no-once", action="store_true", help="without the effectively-once rows (Apache Pulsar)")
    parser.add_argument(
        "--defaults", action="store_true",
        help="only the producer defaults grid: compression x batching delay, raw client (--sizes, --messages)",
    )
    parser.add_argument(
        "--subscriptions", type=int, nargs="+", default=[],
        help="only the idle rows: a worker holding N subscriptions (start, RSS, threads, idle CPU, 20 each handled)",
    )
    parser.add_argument(
        "--plot", default="", metavar="DIR",
        help="draw DIR/throughput.svg and DIR/latency.svg from this run's rows, or from --from's files without a run",
    )
    parser.add_argument("--from", dest="sources", nargs="+", default=[], metavar="JSON", help="results --json wrote")
    args = parser.parse_args()
    if args.plot and args.sources:
        _draw(plot.load(args.sources), args.plot)
        return
    asyncio.run(amain(args))
