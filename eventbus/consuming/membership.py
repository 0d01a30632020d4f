"""Getting a subscription's consumer: the embedded broker's lease, subscribing, standing by, retrying."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Literal

from ..broker.client import Consumer
from ..broker.connect import Connection
from ..errors import EventBusError, Failure, classify
from ..observing.metrics import SubscriptionCounts
from ..registry import Subscription
from ..settings import Settings
from .deadlines import sleep_unless, wait_any
from .outputs import Slot

log = logging.getLogger("eventbus")

State = Literal["starting", "standby", "conflict", "consuming", "stopped"]
#: How often a standby process looks whether the subscription's lease is free.
_LEASE_POLL = 0.25
#: How often a standby member asks Apache Pulsar for the exclusive subscription: first, and at most.
_STANDBY_POLL = (0.5, 5.0)
#: Retrying a subscribe that failed: first delay, and at most.
_RETRY = (1.0, 30.0)
#: What a subscribe refused because another member holds it says: an exclusive or failover group, or a key_shared
#: group held with another type (ConsumerBusy); a slot another member holds (ConsumerAssignError).
_HELD = frozenset({"ConsumerBusy", "ConsumerAssignError"})


class Membership:
    """One (topic, group)'s consumer, once it has one; `state` says where getting it stands."""

    #: Whether this process said it stands by on the embedded broker (once per worker, at WARNING).
    announced = False
    #: The (topic, group)s this process said it stands by for a slot of (once each, at INFO).
    slots_announced: set[tuple[str, str]] = set()

    def __init__(
        self, sub: Subscription, topic: str, connection: Connection, settings: Settings, stopping: asyncio.Event,
        counts: SubscriptionCounts | None, replays_for: str | None, slot: Slot | None = None,
        nudge: asyncio.Event | None = None,
    ) -> None:
        """`slot`: consume only the keys of that slot (a sticky key_shared range), held by one member at a time;
        standing by for it, ask again at `nudge` (its holder let it go) or the next poll, whichever comes first."""
        self.sub, self.topic, self.group, self.replays_for = sub, topic, sub.group, replays_for
        self.slot, self._nudge = slot, nudge
        self._connection = connection
        self._settings = settings
        self._stopping = stopping
        self._counts = counts
        self._lease = connection.profile.lease(topic, sub.group)
        self.state: State = "starting"
        self.consumer: Consumer | None = None
        #: A retry topic that cannot be subscribed, left alone (see `SubscriptionRunner`'s `replays_for`).
        self.left = False

    @property
    def subscription_type(self) -> str:
        """The subscription type asked of the broker (see `BrokerProfile.subscription_type`)."""
        return self._connection.profile.subscription_type(self.sub.subscription_type)

    def release(self) -> None:
        """Give up the lease (once the consumer is closed: the next holder must find it gone)."""
        if self._lease is not None:
            self._lease.release()
        self.state = "stopped"

    async def start(self) -> None:
        """Try to subscribe once: raises what cannot cure itself; `run()` retries the rest."""
        if self._lease is not None and not self._lease.acquire():
            return  # another process consumes it on the embedded broker; run() stands by
        try:
            await self._subscribe()
        except EventBusError as exc:
            if classify(exc.result or "") is not Failure.TRANSIENT:
                if self._leave(exc):
                    return
                raise
            # The broker is there (the handshake said so) but busy, restarting, or
            # holding the subscription for another member: run() keeps trying.
            if exc.result not in _HELD:  # a standby member: run() says so
                log.warning(
                    "cannot subscribe %s group=%s yet (%s): retrying until it works or the worker stops",
                    self.topic, self.group, exc,
                )

    async def take_lease(self) -> bool:
        lease = self._lease
        if lease is None or lease.acquire():
            return True
        self.state = "standby"
        announce = not Membership.announced
        Membership.announced = True
        # One WARNING per worker (a second worker on the same data directory stood by in ten INFO lines).
        log.log(
            logging.WARNING if announce else logging.DEBUG,
            "standby: process %s consumes %s group=%s on the embedded broker (data directory %s); this worker "
            "takes over each subscription such a process holds when it leaves%s",
            lease.holder() or "?", self.topic, self.group, self._settings.data_dir,
            " (said once per worker; the others at DEBUG)" if announce else "",
        )
        while not await sleep_unless(self._stopping, _LEASE_POLL):
            if lease.acquire():
                log.info("taking over %s group=%s", self.topic, self.group)
                return True
        return False

    async def subscribe_until_stopped(self) -> bool:
        """Subscribe, retrying what may cure itself with one backoff; raise the rest."""
        delay, poll = _RETRY[0], _STANDBY_POLL[0]
        busy = False
        while not self._stopping.is_set():
            try:
                await self._subscribe()
                if busy:
                    log.info("taking over %s group=%s", self.topic, self.group)
                return True
            except EventBusError as exc:
                if classify(exc.result or "") is not Failure.TRANSIENT:
                    if self._leave(exc):
                        return False
                    raise
                if exc.result in _HELD:
                    # Another member holds the exclusive subscription: take over as soon as it leaves.
                    if not busy:
                        busy = True
                        self._held_elsewhere()
                    if await self._standby(poll):
                        break
                    # Each refused subscribe is a ConsumerBusy line in the client's log: ask less often, and for a
                    # group held with another type (which someone must change) at most every 30 s.
                    poll = min(poll * 1.5, _STANDBY_POLL[1] if self.state == "standby" else _RETRY[1])
                    continue
                log.warning("still cannot subscribe %s group=%s (%s); next try in %.0fs", self.topic, self.group, exc, delay)
            if await sleep_unless(self._stopping, delay):
                break
            delay = min(delay * 2, _RETRY[1])
        return False

    async def _standby(self, poll: float) -> bool:
        """Wait `poll` seconds, or less when nudged; True once stopping."""
        nudge = self._nudge
        if nudge is None:
            return await sleep_unless(self._stopping, poll)
        await wait_any(nudge, self._stopping, timeout=poll)
        nudge.clear()
        return self._stopping.is_set()

    def _held_elsewhere(self) -> None:
        """A refused subscribe (ConsumerBusy): a standby member, or on Apache Pulsar a group held with another type.

        Apache Pulsar shares a failover, shared or key_shared subscription among consumers of its type: refusing one
        means the group is held with another type (a Java or Go service's consumer, or this app's other version).
        """
        asked = self.subscription_type
        if self.slot is not None and not self._connection.profile.lite:
            self.state = "standby"
            first = (self.topic, self.group) not in Membership.slots_announced
            Membership.slots_announced.add((self.topic, self.group))
            log.log(
                logging.INFO if first else logging.DEBUG, "standby: other members hold %s of %s group=%s; taking "
                "each over when its holder leaves%s", "slots" if first else f"slot {self.slot.index}", self.topic,
                self.group, " (said once per subscription; each slot at DEBUG)" if first else "",
            )
            return
        if asked == "exclusive" or self._connection.profile.lite:
            self.state = "standby"
            log.info("standby: another member consumes %s group=%s (%s); taking over when it leaves", self.topic, self.group, asked)
            return
        self.state = "conflict"  # not ready: this worker takes nothing of the group
        log.error(
            "cannot join group %s on %s: Apache Pulsar refuses a %s consumer (ConsumerBusy), so the group is held by "
            "consumers of another subscription type or Key_Shared mode (another service's, or another version of "
            "this app): give every member the same subscription_type, or this handler a group of its own; retrying "
            "quietly until it can join", self.group, self.topic, asked,
        )

    def _leave(self, exc: EventBusError) -> bool:
        """For a retry topic that cannot be subscribed: say what replaying needs, and leave it (True)."""
        if self.replays_for is None or exc.result in ("AuthenticationError", "AuthorizationError"):
            return False
        self.left = True
        log.warning(
            "cannot subscribe %s group=%s, where `eventbus dlq replay` sends this group's dead letters back (%s); "
            "the group runs without it: create the topic to replay into it", self.topic, self.group, exc,
        )
        return True

    async def _subscribe(self) -> None:
        sub, profile, slot = self.sub, self._connection.profile, self.slot
        self.consumer = await self._connection.client.subscribe(
            self.topic, sub.group, subscription_type=self.subscription_type, initial_position=sub.initial_position,
            receiver_queue_size=self._settings.consumer_receiver_queue_size,
            consumer_name=f"{socket.gethostname()}-{os.getpid()}-{sub.group}{'' if slot is None else f'#{slot.index}'}",
            batch_index_ack=profile.batch_index_ack, sticky=None if slot is None else slot.hashes,
        )
        if self._counts is not None:
            self._counts.subscribes += 1
        asked = self.subscription_type
        shown = asked if asked == sub.subscription_type else f"{asked} (for {sub.subscription_type} on {profile.server_version})"
        log.info(
            "subscribed %s group=%s subscription_type=%s concurrency=%d -> %s",
            self.topic, sub.group, shown, sub.concurrency, sub.name,
        )
