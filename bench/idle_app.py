"""The app `python -m bench --subscriptions N` runs: N key_shared subscriptions, one topic each, writing a byte a message."""

from __future__ import annotations

import os

from eventbus import Router

_OUT = os.open(os.environ["EB_BENCH_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

router = Router()


async def handle(body: dict) -> None:
    os.write(_OUT, b"x")  # the bench counts the file's bytes


for _i in range(int(os.environ["EB_IDLE_COUNT"])):
    router.subscribe(f"{os.environ['EB_IDLE_PREFIX']}-{_i}", "idle", initial_position="earliest")(handle)
