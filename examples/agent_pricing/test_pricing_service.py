"""The request/reply example: an agent's questions answered by the pricing service's worker."""

from __future__ import annotations

from eventbus import Settings
from eventbus.testing import Harness

from pricing_service import plan, pricing


async def test_the_agent_gets_quotes_and_a_refusal(eventbus_settings: Settings) -> None:
    async with Harness(eventbus_settings, [pricing]) as service:
        answers = await plan(service.bus, ["tea", "scone", "caviar"])
    assert answers == {"tea": 4.5, "scone": 2.25, "caviar": "refused: no price for 'caviar'"}
