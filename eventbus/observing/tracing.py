"""OpenTelemetry spans for publish and handling, with the trace context carried in message properties."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:  # the `eventbus[otel]` extra
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - without the extra there is nothing to trace with
    trace = None  # type: ignore[assignment]

_SYSTEM = {"messaging.system": "pulsar"}
#: Characters of a trace-context property read: W3C baggage's own limit. A message's author sets these,
#: and the propagators would parse a 5 MB `traceparent` (its version-00 form takes any suffix) or `tracestate`.
MAX_CONTEXT_CHARS = 8192


def carried(properties: Mapping[str, str]) -> dict[str, str]:
    """The properties the global propagator reads, each at most `MAX_CONTEXT_CHARS` long; longer ones are dropped."""
    fields = propagate.get_global_textmap().fields
    return {k: v for k in fields if (v := properties.get(k)) is not None and len(v) <= MAX_CONTEXT_CHARS}


class Tracing:
    """Makes the spans of one bus; `for_provider` says None when there is nothing to trace into."""

    def __init__(self, provider: Any) -> None:
        self._tracer = provider.get_tracer("eventbus")

    @classmethod
    def for_provider(cls, provider: Any = None) -> Tracing | None:
        """Tracing with `provider`, or with the global one when it is set; None without the extra or a provider."""
        if trace is None:
            return None
        if provider is None:
            provider = trace.get_tracer_provider()
            if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
                return None  # nothing configured: tracing costs nothing
        return cls(provider)

    @contextlib.contextmanager
    def send(self, topic: str, properties: Mapping[str, str] | None, **attributes: Any) -> Iterator[tuple[Span, dict[str, str]]]:
        """A PRODUCER span; yields it and the properties with the trace context added (W3C traceparent by default)."""
        with self._tracer.start_as_current_span(
            f"send {topic}", kind=SpanKind.PRODUCER,
            attributes={**_SYSTEM, "messaging.destination.name": topic, "messaging.operation.type": "send", **attributes},
        ) as span:
            carrier = dict(properties or {})
            propagate.inject(carrier)
            yield span, carrier

    @contextlib.contextmanager
    def process(self, topic: str, group: str, properties: Mapping[str, str], message_id: str, attempt: int) -> Iterator[Span]:
        """A CONSUMER span for one attempt, continuing the trace the message carries; current while it runs."""
        parent = propagate.extract(carried(properties))
        with self._tracer.start_as_current_span(
            f"process {topic}", context=parent, kind=SpanKind.CONSUMER,
            attributes={
                **_SYSTEM, "messaging.destination.name": topic, "messaging.consumer.group.name": group,
                "messaging.operation.type": "process", "messaging.message.id": message_id,
                "eventbus.attempt": attempt,
            },
            record_exception=False, set_status_on_exception=False,
        ) as span:
            yield span


def failed(span: Span, exc: BaseException) -> None:
    """Record `exc` on `span` and mark it an error."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
