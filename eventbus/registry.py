"""Handler registration: `@subscribe(topic, group)` and `Router`."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .codec import Decoder, decoder_for
from .message import Message

SubscriptionType = Literal["key_shared", "shared", "failover", "exclusive"]
InitialPosition = Literal["latest", "earliest"]
SUBSCRIPTION_TYPES: tuple[str, ...] = typing.get_args(SubscriptionType)
ORDERED_TYPES = frozenset({"key_shared", "failover", "exclusive"})
#: Seconds a handler call may run before it counts as failed (twice the default drain timeout).
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Subscription:
    """One registered handler and how it consumes."""

    topic: str
    group: str
    handler: Callable[..., Any]
    subscription: SubscriptionType = "key_shared"
    concurrency: int = 1
    max_retries: int = 3
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    dead_letter: bool = True
    initial_position: InitialPosition = "latest"
    timeout: float | None = DEFAULT_TIMEOUT
    # Derived from the handler's signature at registration.
    decode: Decoder = field(default=bytes, repr=False, compare=False)
    extras: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    is_async: bool = field(default=True, repr=False, compare=False)

    @property
    def name(self) -> str:
        return describe(self.handler)

    @property
    def ordered(self) -> bool:
        return self.subscription in ORDERED_TYPES

    def dead_letter_topic(self, full_topic: str) -> str:
        return f"{full_topic}-{self.group}-DLQ"


def describe(handler: object) -> str:
    module = getattr(handler, "__module__", None) or "?"
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}.{name}"


def _analyse(handler: Callable[..., Any], where: str) -> tuple[Decoder, tuple[tuple[str, str], ...]]:
    """Work out how to call a handler: the payload decoder and the injected extras."""
    from .bus import EventBus  # the bus imports this module

    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: cannot read the handler's signature: {exc}") from None
    try:
        hints = typing.get_type_hints(handler)
    except Exception as exc:
        if any(isinstance(p.annotation, str) for p in signature.parameters.values()):
            raise TypeError(
                f"{where}: cannot resolve the handler's annotations ({exc}); define the types at module level"
            ) from None
        hints = {}
    payload: Decoder | None = None
    extras: list[tuple[str, str]] = []
    for param in signature.parameters.values():
        annotation = hints.get(param.name, param.annotation)
        if annotation is Message:
            extras.append((param.name, "message"))
        elif isinstance(annotation, type) and issubclass(annotation, EventBus):
            extras.append((param.name, "bus"))
        elif payload is None and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            try:
                payload = decoder_for(annotation)
            except TypeError as exc:
                raise TypeError(f"{where}: {exc}") from None
            # Positional-only (builtins such as list.append) cannot take it by name.
            extras.insert(0, (param.name, "payload/" if param.kind == param.POSITIONAL_ONLY else "payload"))
        elif param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"{where}: parameter {param.name!r} has nothing to receive; "
                "annotate it with Message or EventBus, or give it a default"
            )
    if payload is None:
        payload = decoder_for(inspect.Parameter.empty)
    return payload, tuple(extras)


def _check(where: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {problem}")


class Router:
    """A registry of handlers; `EventBus(routers=[...])` runs them.

    >>> router = Router()
    >>> @router.subscribe("orders", "billing", concurrency=8)
    ... async def charge(order: Order, bus: EventBus) -> None:
    ...     await bus.publish("invoices", Invoice.for_order(order), key=order.id)
    """

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []
        self.background: list[Callable[..., Awaitable[None]]] = []

    def subscribe(
        self,
        topic: str,
        group: str,
        *,
        subscription: SubscriptionType = "key_shared",
        concurrency: int = 1,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 30.0,
        dead_letter: bool = True,
        initial_position: InitialPosition = "latest",
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as the handler of `group` on `topic`.

        Messages are acknowledged after the handler returns; when it raises
        (anything, `CancelledError` and `SystemExit` included) or runs longer than
        `timeout` seconds (None: no limit), they are retried `max_retries` times
        with exponential backoff starting at `retry_backoff` seconds (capped at
        `retry_backoff_max`), then sent to the dead-letter topic
        ``{topic}-{group}-DLQ`` unless `dead_letter` is False.
        """

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            where = f"@subscribe({topic!r}, {group!r}) on {describe(handler)}"
            if not callable(handler):
                raise TypeError(f"{where}: the handler is not callable ({type(handler).__name__})")
            _check(where, isinstance(topic, str) and bool(topic.strip()), "topic must be a non-empty string")
            _check(where, isinstance(group, str) and bool(group.strip()), "group must be a non-empty string")
            _check(
                where,
                subscription in SUBSCRIPTION_TYPES,
                f"subscription={subscription!r} is not one of {', '.join(SUBSCRIPTION_TYPES)}",
            )
            _check(where, _is_int(concurrency) and concurrency >= 1, f"concurrency={concurrency!r} must be an int >= 1")
            _check(where, _is_int(max_retries) and max_retries >= 0, f"max_retries={max_retries!r} must be an int >= 0")
            _check(where, _is_num(retry_backoff) and retry_backoff >= 0, f"retry_backoff={retry_backoff!r} must be seconds >= 0")
            _check(
                where,
                _is_num(retry_backoff_max) and retry_backoff_max >= retry_backoff,
                f"retry_backoff_max={retry_backoff_max!r} must be seconds >= retry_backoff",
            )
            _check(where, isinstance(dead_letter, bool), f"dead_letter={dead_letter!r} must be True or False")
            _check(
                where,
                initial_position in ("latest", "earliest"),
                f"initial_position={initial_position!r} must be 'latest' or 'earliest'",
            )
            _check(
                where,
                timeout is None or (_is_num(timeout) and timeout > 0),
                f"timeout={timeout!r} must be seconds > 0, or None for no limit",
            )
            for existing in self.subscriptions:
                if (existing.topic, existing.group) == (topic, group):
                    raise ValueError(
                        f"{where}: group {group!r} on {topic!r} already has a handler ({existing.name}); "
                        "use another group name, or one handler per group"
                    )
            decode, extras = _analyse(handler, where)
            target = inspect.unwrap(handler)
            self.subscriptions.append(
                Subscription(
                    topic=topic,
                    group=group,
                    handler=handler,
                    subscription=subscription,
                    concurrency=concurrency,
                    max_retries=max_retries,
                    retry_backoff=float(retry_backoff),
                    retry_backoff_max=float(retry_backoff_max),
                    dead_letter=dead_letter,
                    initial_position=initial_position,
                    timeout=None if timeout is None else float(timeout),
                    decode=decode,
                    extras=extras,
                    is_async=inspect.iscoroutinefunction(target)
                    or inspect.iscoroutinefunction(getattr(target, "__call__", None)),
                )
            )
            return handler

        return register

    def run_in_background(self, func: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """Run ``async def func(bus)`` beside the handlers while `EventBus.run()` runs.

        It is cancelled first at shutdown, before in-flight handlers drain.
        """
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"{describe(func)}: run_in_background takes an async function of one argument (the bus)")
        self.background.append(func)
        return func


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The registry `subscribe` writes to; `EventBus()` runs it when no routers are given.
default_router = Router()


def subscribe(topic: str, group: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler in the default registry.

    >>> @subscribe("orders", "billing")
    ... async def charge(order: Order) -> None: ...
    """
    return default_router.subscribe(topic, group, **options)
