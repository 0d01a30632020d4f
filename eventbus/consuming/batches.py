"""Handling a batch: decode each, call the handler with them all, finish each at once, say when to retry the failed."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from ..broker.client import RawMessage
from ..codec import DecodeError
from ..errors import BatchFailed, Reject, text
from ..message import Message
from .attempts import Handling, backoff, cancelled_by_us, verdict

log = logging.getLogger("eventbus")


#: Finishes one message of a batch as soon as it is done: (its position, whether to acknowledge it).
Finish = Callable[[int, bool], None]


class BatchHandling(Handling):
    """`Handling` for a batch subscription: one attempt at a batch, each message finished as soon as it is done."""

    _warned_return = False

    async def handle_batch(self, messages: list[RawMessage], attempt: int, finish: Finish) -> float | None:
        """Attempt number `attempt` at `messages`; each one handled, dead-lettered, dropped or refused is finished at
        once (a success is acknowledged while the failed ones wait out their backoff: a crash then sends back only
        those). Returns the backoff before the unfinished ones are tried again (None: all finished); the caller
        retries them in a later batch, so a failing key waits alone and the others go on."""
        live: list[int] = []
        decode, avro = self.sub.handler.decode, self.payloads
        for index, message in enumerate(messages):
            if attempt == 1:
                try:
                    decode(message.data()) if avro is None else await avro.decode(message)
                except DecodeError as exc:  # never handed to the handler
                    finish(index, await self._give_up(message, "undecodable", exc, attempts=1, trace=False))
                    continue
            live.append(index)
        if not live:
            return None
        batch = [messages[i] for i in live]
        # Fresh each attempt: a handler may change them.
        payloads = [decode(m.data()) for m in batch] if avro is None else [await avro.decode(m) for m in batch]
        failures = await self._attempt(batch, payloads, attempt)
        retrying = 0
        for position, index in enumerate(live):
            message, error = messages[index], failures.get(position)
            if error is None:
                self._report.ok(message, payloads[position], None, attempt)
                await self._answer(message)
                finish(index, True)
                continue
            then = verdict(self.sub, error, attempt)
            if then == "refused":
                finish(index, await self.refused(message, payloads[position], error, attempt))
            elif then == "retry":
                self._report.retried(message, payloads[position], None, attempt, error)
                retrying += 1
            else:
                trace = not isinstance(error, Reject)
                finish(index, await self._give_up(
                    message, then, error, attempts=attempt, trace=trace, payload=payloads[position],
                ))
        return self._backoff(retrying, len(batch), attempt, failures) if retrying else None

    async def _attempt(self, batch: list[RawMessage], payloads: list[Any], attempt: int) -> dict[int, BaseException]:
        """Call the handler once with the batch: the failures by position ({} when it succeeded)."""
        metadata = [Message.of(m, m.redelivery_count() + attempt) for m in batch] if self._wants_message else None
        current = self._context()
        current.begin(batch[0], attempt)
        slot = current.slot
        if slot is not None:
            slot.start()
        try:
            try:
                result = await self._call(payloads, metadata, self._bus)  # type: ignore[arg-type]
                if result is not None:
                    self._returned(result)
            except asyncio.CancelledError:
                if slot is None or not slot.timed_out:
                    raise
                raise slot.expired() from None
            finally:
                current.active = False
                if slot is not None:
                    slot.deadline = 0.0
            if current.publishes:
                current.check()
        except BatchFailed as failed:
            problem = failed.problem(len(batch))
            if problem is None:
                return failed.failures
            return dict.fromkeys(range(len(batch)), TypeError(problem))
        except BaseException as exc:
            if cancelled_by_us(exc):
                raise
            return dict.fromkeys(range(len(batch)), exc)
        return {}

    async def _answer(self, message: RawMessage) -> None:
        """A request handled in a batch gets its reply (None: a batch handler returns no value per message)."""
        try:
            await self._answers.send(None, message)
        except Exception as exc:  # the batch's work is done: the requester times out instead
            log.warning("%s could not reply to a request handled in a batch: %s", self.sub.name, text(exc))

    def _returned(self, result: Any) -> None:
        if not self._warned_return:
            self._warned_return = True
            log.warning(
                "%s returned a %s, which goes nowhere: a batch handler publishes what it makes with bus.publish, "
                "or returns None (said once per handler)", self.sub.name, type(result).__name__,
            )

    def _backoff(self, retrying: int, size: int, attempt: int, failures: dict[int, BaseException]) -> float:
        """Log the failed attempt; the seconds before the retry."""
        delay = backoff(self.sub, attempt) * random.uniform(0.8, 1.2)
        first = next(iter(failures.values()))
        log.warning(
            "%s failed on %d of a batch of %d (attempt %d of %d), retrying them in %.2fs: %s",
            self.sub.name, retrying, size, attempt, self.sub.max_retries + 1, delay, text(first),
            exc_info=first if attempt == 1 else None,
        )
        return delay
