"""The producer defaults weighed: compression and batching delay, raw client, msg/s, bytes on the wire, latency."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import uuid
from typing import Any

import _pulsar
import httpx
import pulsar

#: Compression x batching delay (ms), the grid the defaults were chosen from.
GRID = [(compression, delay) for compression in ("NONE", "LZ4", "ZSTD") for delay in (1, 5, 10)]
_WORDS = "order paid shipped refund customer sku warehouse invoice total currency eur usd item quantity note".split()


def realistic(size: int, rng: random.Random) -> bytes:
    """An event as apps send them (ids, numbers, words), padded with words to about `size` bytes: the bench's
    other payloads repeat one letter, which every codec shrinks to nothing."""
    body: dict[str, Any] = {
        "id": str(uuid.UUID(int=rng.getrandbits(128))), "at": time.time(), "amount": round(rng.uniform(1, 999), 2),
        "customer": f"c-{rng.randrange(10**6)}", "status": rng.choice(_WORDS), "note": "",
    }
    room, words = size - len(json.dumps(body)), []
    while room > 0:
        words.append(rng.choice(_WORDS) + str(rng.randrange(100)))
        room -= len(words[-1]) + 1
    body["note"] = " ".join(words)
    return json.dumps(body).encode()[: max(size, 1)]


def _options(compression: str, delay: int) -> dict[str, Any]:
    return dict(
        batching_enabled=True, batching_type=pulsar.BatchingType.KeyBased, batching_max_messages=1000,
        batching_max_allowed_size_in_bytes=1024 * 1024, batching_max_publish_delay_ms=delay,
        compression_type=getattr(pulsar.CompressionType, compression), block_if_queue_full=True,
        max_pending_messages=10_000,
    )


def _wire_bytes(admin: tuple[str, str] | None, topic: str) -> float | None:
    """Bytes the broker took in on `topic` (Apache Pulsar's stats; the embedded broker has none)."""
    if admin is None:
        return None
    url, token = admin
    path = f"{url}/admin/v2/{topic.replace('://', '/')}/stats"
    answer = httpx.get(path, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=10)
    return float(answer.json()["bytesInCounter"])


def one(url: str, auth: dict[str, Any], admin: tuple[str, str] | None, size: int, compression: str, delay: int,
        n: int, seconds: float) -> dict[str, Any]:
    """msg/s of `n` sends (64 keys) and wire bytes per message; then p50/p99 publish -> receive at 1,000 msg/s."""
    rng = random.Random(size)
    payloads = [realistic(size, rng) for _ in range(1000)]
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(_pulsar.LoggerLevel.Error), **auth)
    try:
        topic = f"persistent://public/default/defaults-{uuid.uuid4().hex[:10]}"
        producer = client.create_producer(topic, **_options(compression, delay))
        started = time.perf_counter()
        for i in range(n):
            producer.send_async(payloads[i % 1000], None, partition_key=f"k{i % 64}")
        producer.flush()
        rate = n / (time.perf_counter() - started)
        wire = _wire_bytes(admin, topic)
        p50, p99 = _latency(client, compression, delay, payloads, seconds)
    finally:
        client.close()
    return {"size": size, "compression": compression, "delay_ms": delay, "msg_s": rate,
            "wire_per_msg": None if wire is None else wire / n, "p50_ms": p50, "p99_ms": p99}


def _latency(client: Any, compression: str, delay: int, payloads: list[bytes], seconds: float) -> tuple[float, float]:
    topic = f"persistent://public/default/defaults-lat-{uuid.uuid4().hex[:10]}"
    consumer = client.subscribe(topic, "bench", consumer_type=pulsar.ConsumerType.Exclusive)
    producer = client.create_producer(topic, **_options(compression, delay))
    n, sent_at = int(1000 * seconds), {}

    def publish() -> None:
        start = time.perf_counter() + 0.05
        for i in range(n):
            pause = start + i / 1000 - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent_at[i] = time.perf_counter()
            producer.send_async(payloads[i % 1000], None, partition_key=f"k{i % 64}", properties={"i": str(i)})
        producer.flush()

    sender = threading.Thread(target=publish)
    sender.start()
    latencies = []
    for _ in range(n):
        message = consumer.receive(30_000)
        latencies.append(time.perf_counter() - sent_at[int(message.properties()["i"])])
        consumer.acknowledge(message)
    sender.join()
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1000, q[98] * 1000


def print_defaults(rows: list[dict[str, Any]], broker: str) -> None:
    print(f"\nbroker: {broker}; raw client, key-based batching, 64 keys; latency: an exclusive consumer")
    print(f"{'size':>6} {'compression':>11} {'delay':>6} {'msg/s':>9} {'wire B/msg':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for r in rows:
        wire = "-" if r["wire_per_msg"] is None else f"{r['wire_per_msg']:.1f}"
        print(f"{r['size']:>6} {r['compression']:>11} {r['delay_ms']:>4}ms {r['msg_s']:>9,.0f} {wire:>10} "
              f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}")
