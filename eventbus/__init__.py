"""eventbus: an asyncio-native event bus on Apache Pulsar.

Register handlers, publish, and run them::

    from eventbus import EventBus, Message, subscribe

    @subscribe("orders", "billing", concurrency=8)
    async def charge(order: Order, msg: Message, bus: EventBus) -> None:
        await bus.publish("invoices", Invoice.for_order(order), key=order.id)

    async with EventBus() as bus:        # no URL set: the embedded broker
        await bus.publish("orders", Order(id="o-1"), key="o-1")
        await bus.run()                  # until SIGINT/SIGTERM or bus.stop()

or run a module's handlers in a worker: ``python -m eventbus run handlers``.
"""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml and `eventbus --version` read it

from .bus import EventBus
from .codec import DecodeError
from .consuming.runner import RunningSubscription
from .context import UnawaitedPublish
from .errors import (
    AuthenticationFailed,
    BatchFailed,
    BrokerUnavailable,
    ConfigError,
    EventBusError,
    PublishBatchError,
    PublishError,
    Refuse,
    Reject,
    RequestFailed,
    RequestTimeout,
    StartupFailed,
    SubscriptionFailed,
)
from .message import Message, MessageId
from .registry import (
    Batch,
    Publication,
    Router,
    SubscribeOptions,
    Subscription,
    SubscriptionType,
    default_router,
    publisher,
    subscribe,
)
from .service.dependencies import Depends
from .service.handler import BatchOptions, Publisher, PublishOptions
from .service.middleware import CallNext, Middleware, MiddlewareError, Outgoing, PublishNext
from .settings import Settings

__all__ = [
    "AuthenticationFailed",
    "Batch",
    "BatchFailed",
    "BatchOptions",
    "BrokerUnavailable",
    "CallNext",
    "ConfigError",
    "DecodeError",
    "Depends",
    "EventBus",
    "EventBusError",
    "Message",
    "MessageId",
    "Middleware",
    "MiddlewareError",
    "Outgoing",
    "Publication",
    "PublishBatchError",
    "PublishError",
    "PublishNext",
    "PublishOptions",
    "Publisher",
    "Refuse",
    "Reject",
    "RequestFailed",
    "RequestTimeout",
    "Router",
    "RunningSubscription",
    "Settings",
    "StartupFailed",
    "SubscribeOptions",
    "Subscription",
    "SubscriptionFailed",
    "SubscriptionType",
    "UnawaitedPublish",
    "default_router",
    "publisher",
    "subscribe",
]
