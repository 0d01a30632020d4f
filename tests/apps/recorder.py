"""A handler module for worker-process tests, configured by environment variables.

EB_TOPIC, EB_GROUP: what to consume. EB_RECORD: file that gets "start N" and
"done N" lines, fsynced. EB_BLOCK: a payload value whose handler never returns.
EB_SLOW: seconds each handler takes.
"""

from __future__ import annotations

import os

import anyio

from eventbus import subscribe

RECORD = os.environ["EB_RECORD"]
BLOCK = os.environ.get("EB_BLOCK")
SLOW = float(os.environ.get("EB_SLOW", "0"))


def _record(line: str) -> None:
    with open(RECORD, "a") as f:
        f.write(f"{os.getpid()} {line}\n")
        f.flush()
        os.fsync(f.fileno())


@subscribe(
    os.environ["EB_TOPIC"], os.environ.get("EB_GROUP", "workers"), initial_position="earliest",
    subscription_type=os.environ.get("EB_SUBSCRIPTION_TYPE", "key_shared"),  # type: ignore[arg-type]
)
async def record(n: "int | dict") -> None:
    _record(f"start {n}")
    if BLOCK is not None and str(n) == BLOCK:
        await anyio.sleep_forever()
    await anyio.sleep(SLOW)
    _record(f"done {n}")
