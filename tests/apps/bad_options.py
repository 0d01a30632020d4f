from eventbus import subscribe


@subscribe("orders", "billing", subscription="fanout")
async def charge(order: dict) -> None: ...
