"""A FastAPI service on eventbus: an endpoint publishes, and the app's lifespan runs the handlers beside the HTTP server.

Run it with the embedded broker (from the repository root)::

    pip install fastapi uvicorn
    PYTHONPATH=examples/fastapi_orders uvicorn orders_service:app

then ``curl -X POST localhost:8000/orders -H 'content-type: application/json' -d '{"sku": "tea", "qty": 2}'``
and ``curl localhost:8000/orders/<id>``.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from eventbus import EventBus, Router, Settings

router = Router()


class NewOrder(BaseModel):
    sku: str
    qty: int = Field(ge=1)


class OrderPlaced(BaseModel):
    id: str
    sku: str
    qty: int


router.publisher("orders.placed", OrderPlaced, description="An order was accepted by POST /orders.")


class Reservations:
    """Which orders have their stock reserved; `reserved(id)` waits for one (the test awaits it)."""

    def __init__(self) -> None:
        self.done: dict[str, OrderPlaced] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def add(self, order: OrderPlaced) -> None:
        self.done[order.id] = order
        self._waiters.setdefault(order.id, asyncio.Event()).set()

    async def reserved(self, order_id: str) -> OrderPlaced:
        await self._waiters.setdefault(order_id, asyncio.Event()).wait()
        return self.done[order_id]


reservations = Reservations()


@router.subscribe("orders.placed", "stock", initial_position="earliest")
async def reserve_stock(order: OrderPlaced) -> None:
    """Reserves the stock of each placed order, in order per order id."""
    reservations.add(order)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; `settings` default to the environment (no EVENTBUS_URL: the embedded broker)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One task enters and leaves the lifespan, so a task group may own the worker here.
        async with EventBus(settings, routers=[router]) as bus, anyio.create_task_group() as tasks:
            # The server handles SIGINT/SIGTERM and then leaves the lifespan, which stops the worker.
            await tasks.start(functools.partial(bus.run, handle_signals=False))
            app.state.bus = bus
            yield
            bus.stop()  # in-flight handlers finish; then the bus closes

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.post("/orders", status_code=202)
    async def place_order(order: NewOrder, request: Request) -> dict[str, str]:
        placed = OrderPlaced(id=uuid.uuid4().hex, sku=order.sku, qty=order.qty)
        message_id = await request.app.state.bus.publish("orders.placed", placed, key=placed.id)
        return {"id": placed.id, "message_id": str(message_id)}

    @app.get("/orders/{order_id}")
    async def order_status(order_id: str) -> dict[str, str]:
        if order_id not in reservations.done:
            raise HTTPException(404, f"order {order_id} has no reservation (yet)")
        return {"id": order_id, "status": "reserved"}

    return app


app = create_app()
