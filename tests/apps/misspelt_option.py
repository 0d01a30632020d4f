from eventbus import subscribe


@subscribe("orders", "billing", concurency=2)  # type: ignore[call-arg]
async def charge(order: dict[str, object]) -> None: ...
