"""One trace from a publish through a handler, its follow-up publish and the next handler (OpenTelemetry SDK)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from eventbus import EventBus, Message, Router, Settings

from .conftest import eventually, running


async def test_publish_handle_publish_handle_is_one_trace(settings: Settings, topic: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    first, second = topic, topic + "-next"
    router = Router()
    done: list[int] = []

    @router.subscribe(first, "g", initial_position="earliest")
    async def forward(n: int, bus: EventBus) -> None:
        await bus.publish(second, n + 1)

    @router.subscribe(second, "g", max_retries=1, retry_backoff=0.01, initial_position="earliest")
    async def finish(n: int, msg: Message) -> None:
        if msg.attempt == 1:
            raise ValueError("first attempt fails")
        done.append(n)

    async with EventBus(settings, routers=[router], tracer_provider=provider) as bus, running(bus):
        with provider.get_tracer("test").start_as_current_span("request") as root:
            await bus.publish(first, 1)
        await eventually(lambda: done == [2], what="the second handler")
        await eventually(lambda: len(exporter.get_finished_spans()) >= 6, what="every span to end")
    spans = {(s.name, s.attributes.get("eventbus.attempt")): s for s in exporter.get_finished_spans()}
    full1, full2 = settings.topic(first), settings.topic(second)
    send1, process1 = spans[(f"send {full1}", None)], spans[(f"process {full1}", 1)]
    send2 = spans[(f"send {full2}", None)]
    failed, ok = spans[(f"process {full2}", 1)], spans[(f"process {full2}", 2)]
    trace_id = root.get_span_context().trace_id
    assert {s.context.trace_id for s in (send1, process1, send2, failed, ok)} == {trace_id}, "one trace"
    assert send1.parent.span_id == root.get_span_context().span_id
    assert process1.parent.span_id == send1.context.span_id, "the handler continues the publish's trace"
    assert send2.parent.span_id == process1.context.span_id, "a publish from a handler continues it too"
    assert failed.parent.span_id == ok.parent.span_id == send2.context.span_id
    assert (send1.kind, process1.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert process1.attributes["messaging.system"] == "pulsar"
    assert process1.attributes["messaging.consumer.group.name"] == "g"
    assert process1.attributes["messaging.message.id"] == send1.attributes["messaging.message.id"]
    assert failed.status.status_code == StatusCode.ERROR and ok.status.status_code != StatusCode.ERROR
    (event,) = [e for e in failed.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "ValueError"


async def test_without_a_tracer_provider_nothing_is_traced_or_added(settings: Settings, topic: str) -> None:
    seen: list[Message] = []
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def record(body: int, msg: Message) -> None:
        seen.append(msg)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, 1)
        await eventually(lambda: seen)
    assert "traceparent" not in seen[0].properties, "no global provider set: no context injected"



class _Recording(TraceContextTextMapPropagator):
    """W3C trace context, recording what it is given to read: a propagator of the app's may bound nothing."""

    def __init__(self) -> None:
        self.given: list[dict[str, str]] = []

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        self.given.append(dict(carrier))
        return super().extract(carrier, context) if getter is None else super().extract(carrier, context, getter)


async def test_a_propagator_reads_only_its_fields_and_none_oversized(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message's author writes its properties: a 1 MB one never reaches the propagator, nor one it does not read."""
    recording = _Recording()
    monkeypatch.setattr(propagate, "get_global_textmap", lambda: recording)
    provider = TracerProvider()
    router = Router()
    done: list[int] = []

    @router.subscribe(topic, "g", initial_position="earliest")
    async def record(n: int) -> None:
        done.append(n)

    valid = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    async with EventBus(settings, routers=[router], tracer_provider=provider) as bus, running(bus):
        async with EventBus(settings, routers=[]) as plain:  # no provider: the properties go as written
            await plain.publish(topic, 1, key="k", properties={"traceparent": valid, "tracestate": "a=" + "b" * (1 << 20)})
        await eventually(lambda: done == [1], what="handled")
    assert recording.given == [{"traceparent": valid}], [{k: len(v) for k, v in c.items()} for c in recording.given]
