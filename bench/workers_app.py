"""The app `python -m bench` runs with `eventbus run --workers N`: a no-op handler that writes one byte per message."""

from __future__ import annotations

import os

from eventbus import subscribe

_OUT = os.open(os.environ["EB_BENCH_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@subscribe(os.environ["EB_BENCH_TOPIC"], "bench", initial_position="earliest", dead_letter=False)
async def handle(body: dict) -> None:
    os.write(_OUT, b"x")  # the bench counts the file's bytes: every process's messages
