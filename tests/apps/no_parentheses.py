from eventbus import subscribe


@subscribe  # type: ignore[arg-type, call-arg]
async def charge(order: dict[str, object]) -> None: ...
