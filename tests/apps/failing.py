"""A handler that always fails: its message is dead-lettered at once (EB_TOPIC)."""

from __future__ import annotations

import os

from eventbus import subscribe


@subscribe(os.environ["EB_TOPIC"], "g", max_retries=0, initial_position="earliest")
async def refuse(body: dict[str, object]) -> None:
    raise ValueError(f"cannot take {body}")
