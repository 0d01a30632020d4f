"""Bring completions from the client's threads into the event loop.

The C++ client calls back from its own I/O threads. Waking the loop costs a
syscall, so completions are queued and one wake-up drains all that arrived
meanwhile. A callback that raises inside the client kills the process, so
nothing here raises.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("eventbus")


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._scheduled = False

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; safe from any thread, never raises."""
        try:
            self._pending.append((fn, args))
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon_threadsafe(self._drain)
        except BaseException:  # loop closed: nobody is waiting any more
            pass

    def _drain(self) -> None:
        # Reset before draining so an item appended during the drain schedules another.
        self._scheduled = False
        pending = self._pending
        while pending:
            fn, args = pending.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("eventbus: completion callback failed")
