"""Prometheus metrics of one bus, in a registry of its own, so an app can read them without scraping."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Handler and publish durations: 1 ms to 1 min.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and histograms labelled by topic and group only (never by key or id)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        sub = ["topic", "group"]
        r = self.registry
        self.received = Counter("eventbus_messages_received", "Messages a subscription received.", sub, registry=r)
        self.handled = Counter(
            "eventbus_messages_handled",
            "Handler attempts by outcome: ok, retried, dead_lettered, rejected, invalid_payload, dropped.",
            [*sub, "outcome"], registry=r,
        )
        self.handler_seconds = Histogram(
            "eventbus_handler_duration_seconds", "Time a handler call took.", sub, buckets=_BUCKETS, registry=r
        )
        self.in_flight = Gauge("eventbus_messages_in_flight", "Messages received and not yet finished.", sub, registry=r)
        self.dead_letters = Counter(
            "eventbus_dead_letter_publishes", "Dead-letter publishes by result: ok or error.", [*sub, "result"], registry=r
        )
        self.subscribes = Counter("eventbus_consumer_subscribes", "Consumers created (first subscribe and re-subscribes).", sub, registry=r)
        self.published = Counter("eventbus_messages_published", "Messages the broker confirmed.", ["topic"], registry=r)
        self.publish_errors = Counter(
            "eventbus_publish_errors", "Messages the broker did not confirm, by result.", ["topic", "result"], registry=r
        )
        self.publish_seconds = Histogram(
            "eventbus_publish_duration_seconds",
            "From handing a group of messages to the client until the broker's receipt (one per receipt).",
            ["topic"], buckets=_BUCKETS, registry=r,
        )
