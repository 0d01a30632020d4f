"""A handler that holds every message it starts (EB_TOPIC, shared, 64 at once), writing "start <size>" to EB_RECORD."""

from __future__ import annotations

import os

import anyio

from eventbus import subscribe


@subscribe(os.environ["EB_TOPIC"], "g", subscription_type="shared", concurrency=64, initial_position="earliest")
async def hold(body: bytes) -> None:
    with open(os.environ["EB_RECORD"], "a") as f:
        f.write(f"{os.getpid()} start {len(body)}\n")
    await anyio.sleep_forever()
