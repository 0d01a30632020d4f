"""`eventbus run --workers N` / `--reload`: worker processes started fresh (never forked), restarted, stopped together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("eventbus.supervisor")

#: A worker that keeps dying: restart delays (first, at most), and how many deaths in how long mean giving up.
_RESTART_DELAY = (0.5, 30.0)
_GIVE_UP_AFTER = (5, 60.0)
#: Exit code of a worker that cannot cure itself (configuration): no restart.
_EXIT_USAGE = 2


class Supervisor:
    """Runs `workers` copies of `python -m eventbus run TARGETS` and keeps them running until a signal.

    Each worker is a new interpreter (the Pulsar client is not fork-safe) in a session of its own,
    so a terminal's Ctrl-C reaches the supervisor only, which then sends each worker one SIGTERM
    (a second would end its drain). Each worker stops by itself, gracefully, if the supervisor dies.
    """

    def __init__(
        self,
        targets: Sequence[str],
        workers: int,
        *,
        metrics_port: int | None = None,
        reload: bool = False,
        drain_timeout: float = 30.0,
    ) -> None:
        self.targets = list(targets)
        self.workers = workers
        self.metrics_port = metrics_port
        self.reload = reload
        self.drain_timeout = drain_timeout
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._deaths: list[float] = []
        self._failed: int | None = None
        # Bumped by each reload: a worker that exits after one is started again at once.
        self._generation = 0
        # Set by each reload (then replaced): a worker that failed under --reload waits for it.
        self._reloaded = asyncio.Event()
        # Workers not given up on: when none is left, the supervisor stops.
        self._kept = workers

    def command(self, index: int) -> list[str]:
        command = [
            sys.executable, "-m", "eventbus", "run", *self.targets, "--supervised-by", str(os.getpid()),
            "--worker-number", str(index),
        ]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port + index if self.metrics_port else 0)]
        return command

    async def run(self) -> int:
        """Until SIGINT/SIGTERM: then every worker drains; 0 if they all stopped cleanly."""
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping %d worker(s): each drains its in-flight messages", len(self._procs))
            self._stopping.set()
            self._signal_all(signal.SIGTERM)  # a second signal: the workers stop at once

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            async with asyncio.TaskGroup() as tasks:
                for index in range(self.workers):
                    tasks.create_task(self._keep(index))
                if self.reload:
                    tasks.create_task(self._watch())
                await self._stopping.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return self._failed or 0

    async def _keep(self, index: int) -> None:
        """Run worker `index`, restarting it when it dies, until the supervisor stops."""
        delay = _RESTART_DELAY[0]
        while not self._stopping.is_set():
            generation, reloaded = self._generation, self._reloaded
            proc = await asyncio.create_subprocess_exec(*self.command(index), start_new_session=True)
            self._procs[index] = proc
            log.info("worker %d started (pid %d)", index, proc.pid)
            started = time.monotonic()
            code = await self._wait(proc)
            del self._procs[index]
            if self._stopping.is_set():
                if code != 0:
                    log.error("worker %d (pid %d) exited %d while stopping", index, proc.pid, code)
                    self._failed = self._failed or 1
                return
            if generation != self._generation:
                continue  # stopped for a reload: start the new code at once
            if self.reload:
                # A broken save (a syntax error, say): the fix is the next change, not a restart.
                log.error("worker %d exited %d: waiting for the next change to a .py file", index, code)
                await self._until(reloaded)
                continue
            if code == _EXIT_USAGE:
                self._kept -= 1
                log.error(
                    "worker %d exited %d (configuration): not restarting; %d worker(s) still running",
                    index, code, self._kept,
                )
                self._failed = _EXIT_USAGE
                if not self._kept:
                    self._give_up(_EXIT_USAGE)
                return
            if self._died():
                return
            if time.monotonic() - started > _GIVE_UP_AFTER[1]:
                delay = _RESTART_DELAY[0]  # it had run a while: not a crash loop
            log.warning("worker %d (pid %d) exited %d: restarting in %.1fs", index, proc.pid, code, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                delay = min(delay * 2, _RESTART_DELAY[1])

    def _died(self) -> bool:
        """Count a death; True when there were too many lately and the supervisor gives up."""
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _GIVE_UP_AFTER[1]] + [now]
        if len(self._deaths) < _GIVE_UP_AFTER[0]:
            return False
        log.error("workers died %d times in %.0fs: giving up; stopping the others", len(self._deaths), _GIVE_UP_AFTER[1])
        self._give_up(1)
        return True

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for `event`, or the stop."""
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        """The worker's exit code; past the drain timeout after a stop, it is killed."""
        waiting = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not waiting.done():
            try:
                await asyncio.wait_for(asyncio.shield(waiting), self.drain_timeout + 15)
            except TimeoutError:
                log.error("worker pid %d did not stop within the drain and exit timeouts: killing it", proc.pid)
                proc.kill()
        return await waiting

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _give_up(self, code: int) -> None:
        self._failed = code
        self._stopping.set()
        self._signal_all(signal.SIGTERM)

    async def _watch(self) -> None:
        """`--reload`: on a change to a .py file under the current directory, restart the workers gracefully."""
        import watchfiles

        async for changes in watchfiles.awatch(
            Path.cwd(), watch_filter=watchfiles.PythonFilter(), stop_event=self._stopping
        ):
            names = sorted({Path(path).name for _, path in changes})
            log.info("%s changed: restarting the worker(s) gracefully", ", ".join(names))
            self._generation += 1
            self._reloaded.set()
            self._reloaded = asyncio.Event()
            self._signal_all(signal.SIGTERM)

