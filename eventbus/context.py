"""The handler attempt running now (a context variable): its message's log fields, and the publishes it must await."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any

log = logging.getLogger("eventbus")

#: Where a publish was called: file, line, function.
Caller = tuple[str, int, str]


class UnawaitedPublish(Exception):
    """A handler called `publish` (or `publish_batch`) without `await`: nothing was sent."""


class Attempt:
    """A handler's attempts in one task: the fields its log lines carry (made only when a line asks), its publishes.

    The worker's lane task holds one for all its messages (`begin` per attempt, `end` after): a
    context variable set and an object made per message cost a microsecond, 5 % of a no-op handler.
    """

    __slots__ = ("handler", "owner", "_fields", "message", "number", "active", "publishes", "slot", "outputs")

    def __init__(self, handler: str, fields: Callable[[Any, int], dict[str, object]], owner: object = None) -> None:
        self.handler = handler
        self.owner = owner
        self._fields = fields
        self.message: Any = None
        self.number = 0
        self.active = False
        #: (coroutine, method, topic, caller) of each publish made in the attempt; None until the first.
        self.publishes: list[tuple[Coroutine[Any, Any, Any], str, str, Caller]] | None = None
        #: The owner's per-task state (the handler timeout's deadline slot).
        self.slot: Any = None
        #: Where an effectively-once subscription's outputs of this message go (`consuming.outputs.Outputs`); else None.
        self.outputs: Any = None

    def begin(self, message: Any, number: int) -> None:
        self.message, self.number, self.active, self.publishes = message, number, True, None
        if self.outputs is not None:
            self.outputs.count = 0  # a rerun numbers its outputs as the first run did

    def fields(self) -> dict[str, object]:
        return self._fields(self.message, self.number)

    def check(self) -> None:
        """Raise `UnawaitedPublish` if the attempt made a publish it neither awaited nor handed to a task.

        The coroutine is closed, so Python adds no "never awaited" warning: the failure says it.
        """
        lost = [p for p in self.publishes or () if _never_started(p[0])]
        if not lost:
            return
        for coroutine, *_ in lost:
            coroutine.close()
        method, topic, (filename, line, _) = lost[0][1:]
        raise UnawaitedPublish(
            f"{self.handler} called bus.{method}({topic!r}, ...) without await at {filename}:{line}: nothing was "
            f"sent{f' ({len(lost)} publishes)' if len(lost) > 1 else ''}; write `await bus.{method}(...)`"
        )


#: The handler attempts of this task (None outside handlers; `active` while one runs).
CURRENT: ContextVar[Attempt | None] = ContextVar("eventbus_attempt", default=None)


def tracked(coroutine: Coroutine[Any, Any, Any], method: str, topic: str, where: Caller) -> None:
    """Note a publish coroutine made inside a handler attempt, to check it was awaited (`Attempt.check`)."""
    attempt = CURRENT.get()
    if attempt is not None and attempt.active:
        if attempt.publishes is None:
            attempt.publishes = []
        attempt.publishes.append((coroutine, method, topic, where))


def caller(depth: int = 2) -> Caller:
    """File, line and function of the frame `depth` levels up (1: the one calling this)."""
    frame = sys._getframe(depth)
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def _never_started(coroutine: Coroutine[Any, Any, Any]) -> bool:
    if inspect.getcoroutinestate(coroutine) != inspect.CORO_CREATED:
        return False
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return True
    return not any(task.get_coro() is coroutine for task in tasks)  # create_task(bus.publish(...)) is fine


_watched: set[Any] = set()


def watch_unawaited(code: Any) -> None:
    """Log a publish coroutine of `code` that is never awaited outside handlers as an ERROR naming its caller.

    Python reports a never-awaited coroutine through `warnings._warn_unawaited_coroutine` (3.8 and later),
    as a RuntimeWarning without the caller. The coroutine's `_caller` argument holds it.
    """
    if not _watched:
        original = warnings._warn_unawaited_coroutine  # type: ignore[attr-defined]

        def report(coroutine: Any) -> None:
            if getattr(coroutine, "cr_code", None) not in _watched:
                original(coroutine)
                return
            arguments = coroutine.cr_frame.f_locals if coroutine.cr_frame is not None else {}
            filename, line, function = arguments.get("_caller") or ("?", 0, "?")
            log.error(
                "bus.%s(%r, ...) called in %s at %s:%d was never awaited: nothing was sent; write `await`",
                coroutine.cr_code.co_name.lstrip("_").removesuffix("_now"), arguments.get("topic"), function,
                filename, line,
            )

        warnings._warn_unawaited_coroutine = report  # type: ignore[attr-defined]
    _watched.add(code)
