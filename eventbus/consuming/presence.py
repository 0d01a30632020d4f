"""A worker's presence among its key_shared groups' members: its heartbeat on a topic, and the roster it hears there."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import orjson

from ..broker.client import Client, Producer, Reader
from ..errors import EventBusError
from ..settings import Settings
from .roster import HEARTBEAT, GroupKey, Roster

log = logging.getLogger("eventbus")

#: The presence topic's name in the bus's namespace: non-persistent, so heartbeats are never stored.
PRESENCE_TOPIC = "eventbus-members"
#: How long a starting member listens for the others' answers to its first heartbeat before taking its share of the
#: slots; an answer came back in about 10 ms on Apache Pulsar (one broker, this machine).
SETTLE = 0.5


class Presence:
    """Says every `HEARTBEAT` which groups this worker runs and which of their slots it holds, answers a newcomer's
    first heartbeat at once, and keeps the `Roster` of what it hears. Without it (the topic refused), every member
    asks for every slot and the first to ask holds it."""

    def __init__(self, client: Client, topic: str, me: str | None = None) -> None:
        self.roster = Roster(me or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._client, self._topic = client, topic
        self._groups: dict[GroupKey, tuple[Callable[[], Iterable[int]], asyncio.Event]] = {}
        self._producer: Producer | None = None
        self._reader: Reader | None = None
        self._task: asyncio.Future[None] | None = None
        self._beat = asyncio.Event()
        #: Whether the roster is heard (else every slot is this member's share).
        self.working = False

    @classmethod
    def in_namespace(cls, client: Client, settings: Settings) -> Presence:
        """The presence of the bus's namespace: its members must share it (they share its deduplication anyway)."""
        return cls(client, f"non-persistent://{settings.tenant}/{settings.namespace}/{PRESENCE_TOPIC}")

    def join(self, key: GroupKey, held: Callable[[], Iterable[int]]) -> asyncio.Event:
        """This worker runs `key` (`held`: its slots held now, read at each heartbeat); the event returned is set
        whenever the group's members or the slots they hold change."""
        changed = asyncio.Event()
        self._groups[key] = (held, changed)
        return changed

    def share(self, key: GroupKey, count: int) -> frozenset[int]:
        """The slots of `key` this member should hold."""
        return self.roster.share(key, count) if self.working else frozenset(range(count))

    def held_elsewhere(self, key: GroupKey) -> frozenset[int]:
        """The slots of `key` other members said they hold (none known without the roster)."""
        return self.roster.held_elsewhere(key) if self.working else frozenset()

    def beat_soon(self) -> None:
        """Say what this member holds now (a slot given up: its next holder need not wait for its poll)."""
        self._beat.set()

    async def start(self) -> None:
        """Join the presence topic and listen a moment for the others; on failure, say so once and go without."""
        if not self._groups:
            return
        try:
            self._reader = await self._client.reader(self._topic)
            self._producer = await self._client.create_producer(
                self._topic, batching=False, batching_max_messages=2, batching_max_bytes=1 << 16,
                batching_max_delay_ms=0, compression="none", send_timeout_ms=10_000, max_pending_messages=100,
                producer_name=None,
            )
        except EventBusError as exc:
            log.warning(
                "cannot learn the other members of %s through %s (%s): each key slot goes to the member that asks "
                "first, so a member that joins later takes slots only as others leave; allow this worker to produce "
                "and consume on that topic", _names(self._groups), self._topic, exc,
            )
            await self._close_ends()
            return
        self.working = True
        self._send(hello=True)
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(SETTLE)

    async def close(self) -> None:
        """Stop beating, say this member leaves (its slots are closed by now), and close the topic's ends."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._send(leaving=True)
        await self._close_ends()

    async def _close_ends(self) -> None:
        producer, reader, self._producer, self._reader = self._producer, self._reader, None, None
        try:
            if producer is not None:
                await producer.flush()  # the leaving heartbeat: the others take this member's slots at once
                await producer.close()
        except Exception as exc:  # a broker gone: the others forget this member after EXPIRY
            log.debug("closing the presence producer: %s", exc)
        if reader is not None:
            await reader.close()

    def _send(self, *, hello: bool = False, leaving: bool = False) -> None:
        groups = [[topic, group, sorted(held())] for (topic, group), (held, _) in self._groups.items()]
        if self._producer is not None:
            self._producer.send_unconfirmed(orjson.dumps(
                {"member": self.roster.me, "hello": hello, "leaving": leaving, "groups": groups}
            ))

    async def _run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen)
            tg.start_soon(self._beating)

    async def _beating(self) -> None:
        while True:
            with anyio.move_on_after(HEARTBEAT):
                await self._beat.wait()
            self._beat.clear()
            self._send()
            self._changed(self.roster.expire(time.monotonic()))

    async def _listen(self) -> None:
        assert self._reader is not None
        while True:
            try:
                message = await self._reader.receive()
            except EventBusError as exc:  # the client reconnects the reader by itself
                log.warning("presence: cannot read %s (%s); trying again in %.0fs", self._topic, exc, HEARTBEAT)
                await asyncio.sleep(HEARTBEAT)
                continue
            heard = _read(message.data())
            if heard is None:
                log.debug("presence: ignoring a message that is not a heartbeat on %s", self._topic)
                continue
            member, groups, hello, leaving = heard
            if hello and member != self.roster.me:
                self._beat.set()  # a newcomer: answer before its SETTLE ends
            self._changed(self.roster.heard(member, groups, leaving, time.monotonic()))

    def _changed(self, keys: set[GroupKey]) -> None:
        for key in keys:
            joined = self._groups.get(key)
            if joined is not None:
                joined[1].set()


def _read(data: bytes) -> tuple[str, dict[GroupKey, list[int]], bool, bool] | None:
    """A heartbeat's member, groups with their held slots, hello and leaving; None for anything else."""
    try:
        found: Any = orjson.loads(data)
        groups = {(str(t), str(g)): [int(s) for s in held] for t, g, held in found["groups"]}
        return str(found["member"]), groups, bool(found.get("hello")), bool(found.get("leaving"))
    except (ValueError, TypeError, KeyError):
        return None


def _names(groups: Iterable[GroupKey]) -> str:
    return ", ".join(f"{topic} group={group}" for topic, group in groups)
