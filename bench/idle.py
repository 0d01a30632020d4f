"""What a worker holding N subscriptions costs while nothing arrives: start, RSS, threads, idle CPU; then 20 each."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from eventbus import EventBus, Settings

#: Seconds the idle CPU is sampled over.
IDLE_SECONDS = 5.0
PER_TOPIC = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid: int, name: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(name + ":"))
    return int(line.split()[1])


async def idle_row(url: str, settings: Settings, count: int) -> dict[str, Any]:
    """One worker process (`eventbus run`) with `count` subscriptions, measured from outside."""
    prefix = f"idle-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "handled"
        out.touch()
        env.update(
            EVENTBUS_URL=url, EVENTBUS_TOKEN=settings.jwt() or "", EVENTBUS_METRICS_PORT=str(port),
            PYTHONPATH=str(Path(__file__).parent.parent), EB_BENCH_FILE=str(out), EB_IDLE_COUNT=str(count),
            EB_IDLE_PREFIX=prefix,
        )
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventbus", "run", "bench.idle_app:router", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            while not await asyncio.to_thread(_ready, port):
                if proc.returncode is not None:
                    raise RuntimeError(f"the worker of {count} subscriptions exited {proc.returncode}")
                await asyncio.sleep(0.05)
            ready = time.perf_counter() - started
            await asyncio.sleep(1.0)  # past the start's own work
            cpu_before, at = _cpu_seconds(proc.pid), time.perf_counter()
            await asyncio.sleep(IDLE_SECONDS)
            idle_cpu = (_cpu_seconds(proc.pid) - cpu_before) / (time.perf_counter() - at)
            threads, rss = _status(proc.pid, "Threads"), _status(proc.pid, "VmRSS") / 1024
            sent = time.perf_counter()
            async with EventBus(settings.model_copy(update={"url": url}), routers=[]) as bus:
                await asyncio.gather(*(
                    bus.publish_batch(f"{prefix}-{i}", [{"n": n} for n in range(PER_TOPIC)]) for i in range(count)
                ))
            while out.stat().st_size < count * PER_TOPIC:
                await asyncio.sleep(0.005)
            handled = time.perf_counter() - sent
        finally:
            proc.terminate()
            await proc.wait()
    return {"op": "idle", "path": f"eventbus run, {count} subscriptions", "subscriptions": count, "ready_s": ready,
            "rss_mb": rss, "threads": threads, "idle_cpu": idle_cpu, "handled_s": handled, "size": 0}


def print_idle(rows: list[dict[str, Any]], broker: str) -> None:
    print(f"\nbroker: {broker}, {os.cpu_count()} cores")
    print(f"{'subscriptions':>13} {'ready':>8} {'RSS':>8} {'threads':>8} {'idle CPU':>9}  {PER_TOPIC} each handled")
    for r in rows:
        print(f"{r['subscriptions']:>13} {r['ready_s']:>7.2f}s {r['rss_mb']:>6.0f}MB {r['threads']:>8} "
              f"{r['idle_cpu']:>9.3f}  {r['handled_s']:.2f} s")
