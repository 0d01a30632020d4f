"""Handling a batch: decode each, call the handler with them all, retry the failed together, dead-letter the rest."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from ..broker.client import RawMessage
from ..codec import DecodeError
from ..errors import BatchFailed, Reject, text
from ..message import Message
from .attempts import Handling, backoff, cancelled_by_us, verdict
from .deadlines import sleep_unless

log = logging.getLogger("eventbus")


class BatchHandling(Handling):
    """`Handling` for a batch subscription: `handle_batch` says which messages of a batch may be acknowledged."""

    async def handle_batch(self, messages: list[RawMessage]) -> list[bool]:
        """Handle until each is done: True to acknowledge it (handled, dead-lettered or dropped), False when the bus
        stopped during a retry's backoff (redelivered)."""
        done = [False] * len(messages)
        live: list[int] = []
        for index, message in enumerate(messages):
            try:
                self.sub.handler.decode(message.data())
                live.append(index)
            except DecodeError as exc:  # never handed to the handler
                done[index] = await self._give_up(message, "undecodable", exc, attempts=1, trace=False)
        attempt = 0
        while live:
            attempt += 1
            batch = [messages[i] for i in live]
            payloads = [self.sub.handler.decode(m.data()) for m in batch]  # fresh each attempt: a handler may change them
            failures = await self._attempt(batch, payloads, attempt)
            retry: list[int] = []
            for position, index in enumerate(live):
                error = failures.get(position)
                if error is None:
                    self._report.ok(messages[index], payloads[position], None, attempt)
                    done[index] = True
                    continue
                then = verdict(self.sub, error, attempt)
                if then == "refused":
                    done[index] = await self.refused(messages[index], payloads[position], error, attempt)
                elif then == "retry":
                    self._report.retried(messages[index], payloads[position], None, attempt, error)
                    retry.append(index)
                else:
                    done[index] = await self._give_up(
                        messages[index], then, error, attempts=attempt, trace=not isinstance(error, Reject),
                        payload=payloads[position],
                    )
            live = retry
            if live and await self._back_off(len(live), len(batch), attempt, failures):
                break  # the bus stopped first: the rest is redelivered
        return done

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
                await self._call(payloads, metadata, self._bus)  # type: ignore[arg-type]
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

    async def _back_off(self, retrying: int, size: int, attempt: int, failures: dict[int, BaseException]) -> bool:
        """Log the failed attempt and wait out its backoff; True: the bus stopped first."""
        delay = backoff(self.sub, attempt) * random.uniform(0.8, 1.2)
        first = next(iter(failures.values()))
        log.warning(
            "%s failed on %d of a batch of %d (attempt %d of %d), retrying them in %.2fs: %s",
            self.sub.name, retrying, size, attempt, self.sub.max_retries + 1, delay, text(first),
            exc_info=first if attempt == 1 else None,
        )
        return await sleep_unless(self._finished, delay)
