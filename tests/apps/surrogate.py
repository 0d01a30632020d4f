"""A handler that fails with an error text holding a lone surrogate, as `os.fsdecode` makes of a file name (EB_TOPIC)."""

from __future__ import annotations

import os

from eventbus import subscribe


@subscribe(os.environ["EB_TOPIC"], "g", max_retries=1, retry_backoff=0.01, initial_position="earliest")
async def report(body: dict[str, object]) -> None:
    raise FileNotFoundError("cannot open " + os.fsdecode(b"report-\xff.csv"))
