"""What differs between the embedded broker (pulsar-lite) and Apache Pulsar, decided once at connect."""

from __future__ import annotations

from dataclasses import dataclass

from .embedded import EmbeddedBroker, SubscriptionLease


@dataclass(frozen=True)
class BrokerProfile:
    """The broker the bus talks to, and every way the bus adapts to it."""

    #: What the broker calls itself in the protocol handshake ("Pulsar-Lite-..." for pulsar-lite).
    server_version: str
    #: The embedded broker this process shares, if the bus started or joined one.
    embedded: EmbeddedBroker | None = None

    @property
    def lite(self) -> bool:
        """pulsar-lite, embedded or reached by URL."""
        return self.server_version.startswith("Pulsar-Lite")

    def lease(self, topic: str, group: str) -> SubscriptionLease | None:
        """The lease a process needs to consume this subscription (the embedded broker only)."""
        return self.embedded.lease(topic, group) if self.embedded is not None else None

    @property
    def batch_index_ack(self) -> bool:
        """Acknowledge single messages of a batch to the broker (not only whole batches).

        Apache Pulsar with acknowledgmentAtBatchIndexLevelEnabled then never sends a
        handled message of a batch again, even after a crash; without that setting it
        takes no harm (measured on 4.0.7: a partial batch comes back whole). pulsar-lite
        0.2 takes a partial batch ack for the whole batch and loses the rest: off there.
        """
        return not self.lite

    @property
    def schema_registry(self) -> bool:
        """Whether the broker answers a topic's schema (pulsar-lite 0.2 does not: GetSchema times out after 30 s)."""
        return not self.lite

    @property
    def reads_by_subscription(self) -> bool:
        """Read a topic back through a temporary shared subscription rather than a Reader.

        pulsar-lite 0.2's Reader (an exclusive subscription there) hands messages over again
        and stalls: reading back a topic of 2,001 messages it returned 2,092 and then nothing,
        at entry 1,299 of 1,456 (1 run in 12); a shared subscription read each once, 10 of 10.
        """
        return self.lite

    @property
    def replies_by_reader(self) -> bool:
        """Receive a bus's replies through a Reader (a non-durable subscription) rather than a subscription.

        On Apache Pulsar a requester that ended without closing its bus (SIGKILL, a script's default
        SIGTERM) left its durable reply subscription behind for good, holding every later reply; a
        Reader's goes with its connection. pulsar-lite 0.2's Reader hands messages over again (see
        `reads_by_subscription`): a subscription there, removed when the bus closes.
        """
        return not self.lite

    @property
    def replay_subscription_type(self) -> str:
        """The type `eventbus dlq replay` takes the replay subscription with: the replays' lock on Apache Pulsar.

        Exclusive there: the broker lets one replay (or `dlq show`) of a dead-letter topic hold it, and
        frees it the moment that process dies. pulsar-lite's exclusive dispatcher hands messages over
        again (see `reads_by_subscription`), so there it is shared, under the embedded broker's lease.
        """
        return "shared" if self.lite else "exclusive"

    def subscription_type(self, requested: str) -> str:
        """The subscription type to ask of the broker for a subscription of type `requested`."""
        if self.embedded is not None:
            # The embedded broker's single-active dispatchers (failover, exclusive)
            # hand the same messages over again and again, and its key_shared one
            # strands a key's messages when a consumer leaves. With one consumer
            # at a time (SubscriptionLease), shared delivers in order, once.
            return "shared"
        if requested == "key_shared" and self.lite:
            # pulsar-lite reached by URL: no lease, so one active consumer. Its failover makes
            # a newcomer active at once, while the old member may still hold a key's messages
            # (docs/explanation/embedded-broker.md); its exclusive refuses a second consumer only by
            # dropping the connection, which the client retries for the operation timeout.
            return "failover"
        if requested == "failover" and not self.lite:
            # Pulsar's failover moves the active role without telling the consumer
            # that lost it (pulsar-client 3.13 takes no consumer-event listener), so
            # both would handle a key at once. Exclusive: one member consumes, the
            # others stand by and subscribe when it has drained and left.
            return "exclusive"
        return requested
