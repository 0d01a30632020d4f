from eventbus import subscribe


@subscribe("orders", "billing", subscription_type="fanout")
async def charge(order: dict) -> None: ...
