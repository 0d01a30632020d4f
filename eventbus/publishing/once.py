"""The producers of effectively-once outputs: one per (topic, derived name), unbatched, closed once idle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from ..broker.client import MessageId, build_message
from ..errors import PublishError
from ..registry import Subscription
from ..service.handler import PublishOptions
from ..settings import Settings, admin_urls
from .producers import Producers, TopicProducer, close_producers, failed

log = logging.getLogger("eventbus")

#: A derived producer unused this long is closed: its name is then free for the member that holds its key slot now.
#: A slot can move while its holder lives (a broker restart: another member subscribes before the holder's consumer
#: reconnects), and a holder's idle producer kept the name from the new one: after 60 s idle, a slot stalled 70 s
#: in a chaos run (ProducerBusy).
IDLE_SECONDS = 5.0


class OnceProducers:
    """Sends a handler's outputs under the producer name and sequence id its input gives them (`consuming.outputs`)."""

    def __init__(self, producers: Producers, settings: Settings | None = None, idle_seconds: float = IDLE_SECONDS) -> None:
        """`settings`: where to ask whether an output topic deduplicates (its applied policy: the topic's own, else
        its namespace's); None: every output topic does, as its namespace."""
        self._producers, self._settings = producers, settings
        self._deduplicates: dict[str, asyncio.Future[bool]] = {}
        self._idle = idle_seconds
        self._tasks: dict[tuple[str, str], asyncio.Task[TopicProducer]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def _get(self, full: str, name: str) -> TopicProducer:
        key = (full, name)
        task = self._tasks.get(key)
        if task is None or failed(task):
            if self._producers.closed:
                raise PublishError(full, "BusClosed", maybe_stored=False)
            task = asyncio.ensure_future(self._producers.create_named(full, name))
            self._tasks[key] = task
            asyncio.get_running_loop().call_later(self._idle, self._close_if_idle, key, task, -1)
        return await asyncio.shield(task)

    async def enqueue_once(
        self, topic: str, name: str, sequence_id: int, data: bytes, content_type: str | None, options: PublishOptions
    ) -> asyncio.Future[MessageId] | None:
        """Hand the output to its producer now (in call order); the future resolves with its receipt. None: `topic`
        does not deduplicate (a topic policy), so the output goes at least once."""
        # Its full name; an unwritable topic refused.
        full = (self._producers.ready.get(topic) or await self._producers.get(topic)).topic
        if not await self._topic_deduplicates(full):
            return None
        producer = await self._get(full, name)
        numbered: PublishOptions = {**options, "sequence_id": sequence_id}
        message, size = build_message(data, content_type, **numbered)
        if not producer.reserve_nowait():
            await producer.reserve()
        return producer.enqueue(message, options.get("key"), size, False)

    async def send_plain(self, topic: str, data: bytes, content_type: str | None, options: PublishOptions) -> MessageId:
        """An output whose input's place gives it no id: sent at least once, as any publish."""
        message, size = build_message(data, content_type, **options)
        producer = await self._producers.get(topic)
        # As any publish: the bus's own producers batch, and only the bus flushes their batches.
        return await producer.send(message, options.get("key"), size, batchable=options.get("deliver_after") is None)

    async def _topic_deduplicates(self, topic: str) -> bool:
        """Whether the broker deduplicates `topic` (a full name), asked once per topic; a topic policy may differ
        from its namespace's. Unknown (no admin API, an error): as its namespace, which does."""
        known = self._deduplicates.get(topic)
        if known is None:
            known = self._deduplicates[topic] = asyncio.ensure_future(self._ask(topic))
        return known.result() if known.done() else await asyncio.shield(known)

    async def _ask(self, topic: str) -> bool:
        if self._settings is None or not topic.startswith("persistent://"):
            return True
        status, said, base = await ask_admin(
            self._settings, f"/admin/v2/persistent/{topic.split('://', 1)[1]}/deduplicationEnabled?applied=true"
        )
        if status == 200 and said == "false":
            log.warning(
                "effectively_once: %s does not deduplicate (a topic policy turns it off), so the outputs sent there "
                "are stored at least once (a rerun stores them again): pulsar-admin topics set-deduplication %s "
                "--enable", topic, topic,
            )
            return False
        if status != 200:
            log.info("cannot ask the admin API at %s whether %s deduplicates (%s): taken as its namespace", base, topic, said)
        return True

    def _close_if_idle(self, key: tuple[str, str], task: asyncio.Task[TopicProducer], seen: int) -> None:
        if self._producers.closed or self._tasks.get(key) is not task or not task.done() or failed(task):
            return
        producer = task.result()
        if producer.sent != seen:
            asyncio.get_running_loop().call_later(self._idle, self._close_if_idle, key, task, producer.sent)
            return
        del self._tasks[key]
        closing = asyncio.ensure_future(producer.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def release(self, group: str, topic: str) -> None:
        """Close the producers of `group`'s outputs for messages of `topic` (or its partitions): the member taking its
        messages over needs their names, which the broker lets one producer hold at a time."""
        def theirs(name: str) -> bool:
            held_by, partition, _ = name.split(":", 1)[1].rsplit(":", 2)
            return held_by == group and (partition == topic or partition.startswith(f"{topic}-partition-"))

        mine = [key for key in self._tasks if theirs(key[1])]
        await close_producers([self._tasks.pop(key) for key in mine], set())

    async def close(self) -> None:
        """Settle every accepted output, then close each producer (before the client closes)."""
        tasks, self._tasks = list(self._tasks.values()), {}
        await close_producers(tasks, self._closing)


async def deduplicating(settings: Settings, lite: bool) -> tuple[bool, str]:
    """Whether the bus's namespace deduplicates, and how that is known (said once at start)."""
    if lite:
        return False, "the embedded broker (pulsar-lite) does not deduplicate"
    if settings.deduplication is not None:
        return settings.deduplication, f"EVENTBUS_DEDUPLICATION={str(settings.deduplication).lower()}"
    namespace = f"{settings.tenant}/{settings.namespace}"
    fix = f"set EVENTBUS_DEDUPLICATION=true if {namespace} deduplicates"
    status, said, base = await ask_admin(settings, f"/admin/v2/namespaces/{namespace}/deduplication")
    if status is None:
        return False, f"cannot ask the admin API at {base} ({said}); {fix}"
    if status != 200:
        return False, f"the admin API at {base} answered {status}; {fix}"
    if said == "true":
        return True, f"{namespace} deduplicates (its policy)"
    if said == "false":
        return False, f"{namespace} has deduplication off (pulsar-admin namespaces set-deduplication {namespace} --enable)"
    return False, f"{namespace} sets no deduplication policy (the broker's default, off unless brokerDeduplicationEnabled); {fix}"


async def ask_admin(settings: Settings, path: str) -> tuple[int | None, str, str]:
    """GET `path` of the admin API: its status (None: no answer), its text stripped (or the error's kind), and the
    API's address."""
    base = admin_urls(settings)[0]
    verify: Any = str(settings.tls_trust_certs_file) if settings.tls_trust_certs_file else True
    try:
        # No redirects: the token goes to the configured admin API only.
        async with httpx.AsyncClient(
            headers=settings.admin_headers(), timeout=10.0, verify=verify, follow_redirects=False
        ) as http:
            response = await http.get(f"{base}{path}")
    except httpx.HTTPError as exc:
        return None, type(exc).__name__, base
    return response.status_code, response.text.strip(), base


async def once_sender(
    settings: Settings, subs: Sequence[Subscription], producers: Producers, lite: bool
) -> OnceProducers | None:
    """The sender of effectively-once outputs, when a subscription asks for them and the namespace deduplicates;
    otherwise one WARNING naming them and why (their outputs go at least once)."""
    names = sorted({sub.name for sub in subs if sub.effectively_once})
    if not names:
        return None
    on, why = await deduplicating(settings, lite)
    if not on:
        log.warning(
            "effectively_once is off for %s: %s; their outputs are stored at least once (a rerun stores them again)",
            ", ".join(names), why,
        )
        return None
    log.info("effectively-once outputs for %s: %s", ", ".join(names), why)
    return OnceProducers(producers, settings)
