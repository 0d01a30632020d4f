from __future__ import annotations

import pytest
from pydantic import BaseModel

from eventbus import EventBus, Message, Router, Settings
from eventbus.errors import ConfigError


class Order(BaseModel):
    id: str


def test_decorator_returns_the_function_and_records_options() -> None:
    router = Router()

    @router.subscribe("orders", "billing", subscription_type="shared", concurrency=4, max_retries=5)
    async def charge(order: Order, msg: Message, bus: EventBus) -> None: ...

    assert callable(charge)
    (sub,) = router.subscriptions
    assert (sub.topic, sub.group, sub.subscription_type, sub.concurrency, sub.max_retries) == (
        "orders", "billing", "shared", 4, 5,
    )
    assert sub.handler.parameters == (("order", "payload"), ("msg", "message"), ("bus", "bus"))
    assert sub.handler.is_async and not sub.ordered
    assert sub.dead_letter_topic("persistent://public/default/orders") == "persistent://public/default/orders-billing-DLQ"


def test_duplicate_topic_and_group_is_rejected_naming_both() -> None:
    router = Router()
    router.subscribe("orders", "billing")(lambda o: None)
    with pytest.raises(ValueError, match=r"on_order.*already has a handler"):

        @router.subscribe("orders", "billing")
        def on_order(o: dict) -> None: ...


def test_duplicates_across_routers_are_rejected_by_the_bus() -> None:
    a, b = Router(), Router()
    a.subscribe("orders", "billing")(lambda o: None)
    b.subscribe("persistent://public/default/orders", "billing")(lambda o: None)
    with pytest.raises(ConfigError, match="two handlers"):
        EventBus(Settings(_env_file=None), routers=[a, b]).subscriptions()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"subscription_type": "fanout"}, "subscription_type='fanout' is not one of key_shared, shared, failover, exclusive"),
        ({"concurrency": 0}, "concurrency=0"),
        ({"concurrency": 2.5}, "concurrency=2.5"),
        ({"max_retries": -1}, "max_retries=-1"),
        ({"retry_backoff": -1}, "retry_backoff=-1"),
        ({"retry_backoff": 5, "retry_backoff_max": 1}, "retry_backoff_max=1"),
        ({"dead_letter": "yes"}, "dead_letter='yes'"),
        ({"initial_position": "middle"}, "initial_position='middle'"),
        ({"reject_on": ValueError}, "reject_on=<class 'ValueError'> must be a tuple of exception types"),
        ({"reject_on": ("ValueError",)}, "must be a tuple of exception types"),
        ({"topic": "orders/eu"}, "topic 'orders/eu' is neither a short name nor a full name"),
        ({"topic": "persistent://public/orders"}, "is not a full name (persistent://tenant/namespace/topic)"),
        ({"topic": "http://a/b/c"}, "is not a full name"),
        ({"topic": " "}, "is empty"),
    ],
)
def test_bad_options_raise_at_import_naming_the_handler(options: dict, words: str) -> None:
    router = Router()
    topic = options.pop("topic", "orders")
    with pytest.raises(ValueError, match="handle_it") as caught:

        @router.subscribe(topic, "g", **options)
        async def handle_it(o: dict) -> None: ...

    assert words in str(caught.value)


def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError, match="not callable"):
        Router().subscribe("orders", "g")("not a function")  # type: ignore[arg-type]


def test_extra_parameters_need_a_source() -> None:
    with pytest.raises(TypeError, match="parameter 'other' has nothing to receive"):

        @Router().subscribe("orders", "g")
        async def handler(order: dict, other: int) -> None: ...


class NotAModel:
    pass


def test_undecodable_annotation_is_rejected_at_import() -> None:
    with pytest.raises(TypeError, match="handler: cannot decode payloads as") as caught:

        @Router().subscribe("orders", "g")
        async def handler(order: NotAModel) -> None: ...

    assert "arbitrary_types_allowed" not in str(caught.value), "pydantic's advice for its own models does not apply"
    assert "annotate the payload with a pydantic model" in str(caught.value)


def test_unresolvable_annotation_is_rejected_at_import() -> None:
    class Local:
        pass

    with pytest.raises(TypeError, match="handler: cannot resolve the handler's annotations"):

        @Router().subscribe("orders", "g")
        async def handler(order: Local) -> None: ...
