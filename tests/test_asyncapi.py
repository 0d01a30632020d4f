"""`eventbus docs`: the app's AsyncAPI 3.0 document, validated against the official JSON Schema (tests/asyncapi/)."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from eventbus import Router, Settings
from eventbus.operating.asyncapi import document
from eventbus.topics import DEAD_LETTER_PROPERTIES, SCHEMA_VERSION
from eventbus.cli import main

SCHEMA = json.loads((Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json").read_text())


class Order(BaseModel):
    """An order to charge."""

    id: str
    qty: int
    placed: datetime


class Line(BaseModel):
    sku: str


class Basket(BaseModel):
    lines: list[Line]


class Invoice(BaseModel):
    order: str


def app() -> Router:
    router = Router()
    router.publisher("invoices", Invoice, description="one per charged order")

    @router.subscribe("orders", "billing", concurrency=8, max_retries=5, subscription_type="key_shared")
    async def charge(order: Order) -> None:
        """Charges the order's card."""

    @router.subscribe("orders", "audit", subscription_type="shared", dead_letter=False)
    async def audit(order: dict) -> None: ...

    @router.subscribe("persistent://shop/eu/baskets", "pricing")
    async def price(basket: Basket) -> None: ...

    @router.subscribe("raw", "archive")
    async def archive(data: bytes) -> None: ...

    return router


def errors(doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(doc)]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_the_document_validates_against_the_official_asyncapi_schema_and_every_ref_resolves() -> None:
    settings = Settings(_env_file=None, url="pulsar+ssl://b1:6651,b2:6651", tenant="shop", namespace="orders")
    doc = document([app()], settings, title="shop", version="1.2.3")

    assert errors(doc) == []
    for ref in refs(doc):
        resolve(doc, ref)  # raises KeyError for a dangling one
    # The validator is not lenient: what a hand-written document gets wrong, it catches.
    for mutate in (
        lambda d: d["operations"]["orders.billing.receive"].update(action="consume"),
        lambda d: d["channels"]["orders"]["bindings"]["pulsar"].update(persistence="durable"),
        lambda d: d["components"]["schemas"]["Order"].update(type=7),
        lambda d: d.pop("info"),
    ):
        broken = copy.deepcopy(doc)
        mutate(broken)
        assert errors(broken), "the schema let a broken document through"


def test_channels_operations_and_schemas_say_what_the_app_does() -> None:
    settings = Settings(_env_file=None, url="pulsar+ssl://b1:6651,b2:6651", tenant="shop", namespace="orders")
    doc = document([app()], settings, title="shop", version="1.2.3")

    assert doc["servers"] == {
        "broker": {"host": "b1:6651,b2:6651", "protocol": "pulsar+ssl", "bindings": {"pulsar": {"tenant": "shop", "bindingVersion": "0.1.0"}}}
    }
    addresses = {cid: c["address"] for cid, c in doc["channels"].items()}
    assert addresses == {
        "orders": "persistent://shop/orders/orders",
        "orders-billing-DLQ": "persistent://shop/orders/orders-billing-DLQ",
        "orders-billing-RETRY": "persistent://shop/orders/orders-billing-RETRY",
        "shop-eu-baskets": "persistent://shop/eu/baskets",
        "shop-eu-baskets-pricing-DLQ": "persistent://shop/eu/baskets-pricing-DLQ",
        "shop-eu-baskets-pricing-RETRY": "persistent://shop/eu/baskets-pricing-RETRY",
        "raw": "persistent://shop/orders/raw",
        "raw-archive-DLQ": "persistent://shop/orders/raw-archive-DLQ",
        "raw-archive-RETRY": "persistent://shop/orders/raw-archive-RETRY",
        "invoices": "persistent://shop/orders/invoices",
    }
    ops = doc["operations"]
    billing = ops["orders.billing.receive"]
    assert billing["action"] == "receive" and billing["channel"] == {"$ref": "#/channels/orders"}
    assert billing["description"] == "Charges the order's card."
    assert billing["x-eventbus-subscription"] == {
        "group": "billing", "subscriptionType": "key_shared", "ordered": True, "concurrency": 8, "maxRetries": 5,
        "retryBackoffSeconds": 0.5, "retryBackoffMaxSeconds": 30.0, "timeoutSeconds": 60.0,
        "initialPosition": "latest", "deadLetterTopic": "persistent://shop/orders/orders-billing-DLQ",
        "returnsTo": None, "batch": None,
    }
    assert ops["orders.audit.receive"]["x-eventbus-subscription"]["deadLetterTopic"] is None
    assert "orders.audit.dead-letter" not in ops
    assert ops["orders.billing.dead-letter"]["action"] == "send"
    assert ops["orders.billing.receive-replayed"]["channel"] == {"$ref": "#/channels/orders-billing-RETRY"}
    assert ops["invoices.send"] == {
        "action": "send", "channel": {"$ref": "#/channels/invoices"},
        "messages": [{"$ref": "#/channels/invoices/messages/Invoice"}], "description": "one per charged order",
    }

    def payload(operation: str) -> Any:
        message = resolve(doc, resolve(doc, ops[operation]["messages"][0]["$ref"])["$ref"])
        return message["contentType"], message["payload"]

    assert payload("orders.billing.receive") == ("application/json", {"$ref": "#/components/schemas/Order"})
    assert payload("orders.audit.receive") == ("application/json", {"type": "object"})
    assert payload("raw.archive.receive") == ("application/octet-stream", {"type": "string", "format": "binary"})
    schemas = doc["components"]["schemas"]
    assert schemas["Order"] == Order.model_json_schema()
    assert schemas["Basket"]["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/Line"}
    assert schemas["Line"] == Line.model_json_schema()
    dead = resolve(doc, resolve(doc, ops["orders.billing.dead-letter"]["messages"][0]["$ref"])["$ref"])
    assert dead["payload"] == {"$ref": "#/components/schemas/Order"}
    headers = resolve(doc, dead["headers"]["$ref"])
    assert set(headers["properties"]) == {*DEAD_LETTER_PROPERTIES, SCHEMA_VERSION}
    assert headers["required"] == list(DEAD_LETTER_PROPERTIES)  # the schema version only on an AVRO record's


def test_eventbus_docs_writes_the_example_apps_document_as_json_or_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parent.parent)
    assert main(["docs", "handlers", "--title", "example", "--app-version", "2.0.0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main(["docs", "handlers", "--title", "example", "--app-version", "2.0.0", "-o", str(tmp_path / "api.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "api.yaml").read_text()) == doc
    assert errors(doc) == []
    assert doc["info"] == {"title": "example", "version": "2.0.0"}
    receives = {
        (op["x-eventbus-subscription"]["group"], op["channel"]["$ref"])
        for op in doc["operations"].values() if "x-eventbus-subscription" in op
    }
    assert receives == {
        ("agent-inbox", "#/channels/agent.messages"), ("pipeline-aggregator", "#/channels/pipeline.records"),
        ("workflow-runner", "#/channels/workflow.steps"), ("workflow-audit", "#/channels/workflow.events"),
    }
    assert doc["operations"]["workflow.events.send"]["messages"] == [{"$ref": "#/channels/workflow.events/messages/StepEvent"}]

    assert main(["docs"]) == 2
    assert "error: name the app: `myapp.handlers`" in capsys.readouterr().err


def test_return_values_request_replies_and_batches_are_documented() -> None:
    from eventbus import Batch

    router = Router()

    @router.subscribe("orders", "billing", returns_to="invoices")
    async def charge(order: Order) -> Invoice:
        return Invoice(order=order.id)

    @router.subscribe("baskets", "pricing")
    async def quote(basket: Basket) -> Line: ...

    @router.subscribe("orders", "warehouse", batch=Batch(max_messages=500, max_wait=0.2))
    async def load(orders: list[Order]) -> None: ...

    settings = Settings(_env_file=None)
    doc = document([router], settings, title="shop", version="1")
    assert errors(doc) == []
    for ref in refs(doc):
        resolve(doc, ref)
    ops = doc["operations"]
    assert ops["orders.billing.receive"]["x-eventbus-subscription"]["returnsTo"] == settings.topic("invoices")
    def message(ref: str) -> Any:
        node = resolve(doc, ref)
        return resolve(doc, node["$ref"]) if "$ref" in node else node

    assert message(ops["invoices.send"]["messages"][0]["$ref"])["payload"] == {"$ref": "#/components/schemas/Invoice"}
    reply = ops["baskets.pricing.receive"]["reply"]
    assert reply["address"]["location"] == "$message.header#/eventbus-reply-to"
    assert message(reply["messages"][0]["$ref"])["payload"] == {"$ref": "#/components/schemas/Line"}
    batch = ops["orders.warehouse.receive"]
    assert batch["x-eventbus-subscription"]["batch"] == {"maxMessages": 500, "maxWaitSeconds": 0.2}
    assert "reply" not in batch
    assert message(batch["messages"][0]["$ref"])["payload"] == {"$ref": "#/components/schemas/Order"}
