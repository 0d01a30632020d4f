"""What a worker opens before its first message and closes after the drain: lifespans, then app-scoped dependencies."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import StartupFailed
from ..registry import Lifespan, Router, Subscription
from ..service.dependencies import AppScope, Plan, Provider
from ..service.handler import Publisher, handler_name


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
            except Exception as exc:
                raise _failed(f"lifespan {handler_name(lifespan)}", exc) from exc
        try:
            await self.app.open(self.plans, bus, stack)
        except Exception as exc:
            raise _failed("an app-scoped dependency", exc) from exc


def _failed(what: str, exc: Exception) -> StartupFailed:
    error = StartupFailed(f"{what} raised on entry, so the worker stopped before consuming: {type(exc).__name__}: {exc}")
    error.details = "".join(traceback.format_exception(exc))
    return error
