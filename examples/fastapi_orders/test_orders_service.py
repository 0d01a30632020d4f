"""The FastAPI example: POST an order through httpx, see the handler reserve it, read it back."""

from __future__ import annotations

import asyncio

import httpx

from eventbus import Settings

from orders_service import create_app, reservations


async def test_an_order_posted_to_the_endpoint_is_reserved_by_the_handler(eventbus_settings: Settings) -> None:
    app = create_app(eventbus_settings)  # the test's own namespace on the session's embedded broker
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/orders", json={"sku": "tea", "qty": 2})
        assert response.status_code == 202, response.text
        order_id = response.json()["id"]

        reserved = await asyncio.wait_for(reservations.reserved(order_id), timeout=5)
        assert (reserved.sku, reserved.qty) == ("tea", 2)
        assert (await client.get(f"/orders/{order_id}")).json() == {"id": order_id, "status": "reserved"}
        assert (await client.post("/orders", json={"sku": "tea", "qty": 0})).status_code == 422
