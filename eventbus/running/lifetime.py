"""What a worker opens before its first message and closes after the drain: lifespans, then app-scoped dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import anyio

from ..errors import StartupFailed, text
from ..registry import Lifespan, Router, Subscription
from ..service.dependencies import AppScope, Plan, Provider
from ..service.handler import Publisher, handler_name

log = logging.getLogger("eventbus")
T = TypeVar("T")


@dataclass
class Lifetime:
    """The lifespans in order of entry, and the worker's app-scoped dependency values with the plans that need them."""

    lifespans: Sequence[Lifespan] = ()
    app: AppScope = field(default_factory=AppScope)
    plans: Sequence[Plan] = ()

    @classmethod
    def of(
        cls, first: Sequence[Lifespan], routers: Sequence[Router], subs: Sequence[tuple[str, Subscription]],
        overrides: Mapping[Provider, Provider],
    ) -> Lifetime:
        """The lifespans `first` then each router's, and the subscriptions' app-scoped dependencies."""
        app = AppScope(overrides)
        lifespans = [*first, *(func for router in routers for func in router.lifespans)]
        return cls(lifespans, app, [sub.handler.plan_for(app.overrides) for _, sub in subs])

    async def open(self, stack: contextlib.AsyncExitStack, bus: Publisher) -> None:
        """Enter every lifespan, then make the app-scoped values; `stack` exits them in reverse.

        Raises `StartupFailed` with the traceback of whichever raised (what was entered before it is exited).
        """
        for lifespan in self.lifespans:
            try:
                await stack.enter_async_context(lifespan(bus))
            except BaseException as exc:  # SystemExit and a CancelledError of its own too: one named line
                _raise_failed(f"lifespan {handler_name(lifespan)}", exc)
        try:
            await self.app.open(self.plans, bus, stack)
        except BaseException as exc:
            _raise_failed("an app-scoped dependency", exc)


class Exits(contextlib.AsyncExitStack):
    """Closes what a worker opened, in reverse, each on its own: within what is left of `timeout` seconds for all
    of them, a failure logged with its name and traceback, and every other one closed all the same.

    A plain exit stack hands one exit's exception to the next (a lifespan's code after `yield` then never ran)
    and waits forever for one that hangs (the worker outlived SIGTERM with no line).
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout, self._deadline = timeout, 0.0

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        value = await cm.__aenter__()
        self.push_async_callback(self._exit, cm)
        return value

    async def _exit(self, cm: AbstractAsyncContextManager[Any]) -> None:
        now = anyio.current_time()
        self._deadline = self._deadline or now + self._timeout
        name = _name_of(cm)
        with anyio.move_on_after(max(0.0, self._deadline - now)) as scope:
            try:
                await cm.__aexit__(None, None, None)
            except Exception as exc:
                log.error("%s raised on exit (the others exit all the same): %s", name, text(exc), exc_info=exc)
        if scope.cancelled_caught:
            log.error("%s did not exit within EVENTBUS_SHUTDOWN_EXIT_TIMEOUT=%gs: left unfinished", name, self._timeout)


def _name_of(cm: object) -> str:
    """What a context manager was made from: a lifespan's or a provider's function name."""
    gen = getattr(cm, "gen", None)
    code = getattr(gen, "ag_code", None) or getattr(gen, "gi_code", None)
    func = getattr(cm, "func", None)  # a provider run in a thread
    if code is not None:
        return f"{code.co_qualname}"
    return getattr(func, "__qualname__", None) or type(cm).__qualname__


def _raise_failed(what: str, exc: BaseException) -> NoReturn:
    """Raise the StartupFailed naming `what`; or `exc` itself when it is the worker being cancelled."""
    if isinstance(exc, asyncio.CancelledError) and (task := asyncio.current_task()) and task.cancelling():
        raise exc
    error = StartupFailed(f"{what} raised on entry, so the worker stopped before consuming: {type(exc).__name__}: {exc}")
    error.details = "".join(traceback.format_exception(exc))
    raise error from exc
