"""Request/reply: a pricing service answers, and an agent asks it for quotes while it plans.

    python -m eventbus run pricing_service:pricing      # the service (from this directory)
    python pricing_service.py tea cake                   # an agent asking it

The service's handler returns its answer; `bus.request` publishes the question with a reply
address and waits for that answer. A question it cannot answer comes back as `RequestFailed`.
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import BaseModel

from eventbus import EventBus, Reject, RequestFailed, Router


class Ask(BaseModel):
    sku: str
    qty: int = 1


class Quote(BaseModel):
    sku: str
    qty: int
    total: float


PRICES = {"tea": 4.5, "cake": 3.0, "scone": 2.25}
pricing = Router()


@pricing.subscribe("pricing.ask", "pricing", concurrency=8)
async def price(ask: Ask) -> Quote:
    if ask.sku not in PRICES:
        raise Reject(f"no price for {ask.sku!r}")  # the agent gets RequestFailed at once, not a timeout
    return Quote(sku=ask.sku, qty=ask.qty, total=PRICES[ask.sku] * ask.qty)


async def plan(bus: EventBus, skus: list[str]) -> dict[str, float | str]:
    """The agent: ask for every quote at once; a refused one is noted, not fatal."""

    async def one(sku: str) -> float | str:
        try:
            quote: Quote = await bus.request("pricing.ask", Ask(sku=sku), response_type=Quote, timeout=10)
        except RequestFailed as exc:
            return f"refused: {exc.error}"
        return quote.total

    return dict(zip(skus, await asyncio.gather(*(one(sku) for sku in skus))))


async def main(skus: list[str]) -> None:
    async with EventBus(routers=[]) as bus:
        print(await plan(bus, skus))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["tea", "cake"]))
