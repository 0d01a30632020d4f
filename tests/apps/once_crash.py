"""An effectively-once handler that stores its two outputs for message 3, then is SIGKILLed before its acknowledgement
(once: ONCE_MARK is made first); every other message, and 3 on the rerun, is handled plainly (ONCE_TOPIC)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from eventbus import EventBus, subscribe

TOPIC = os.environ["ONCE_TOPIC"]
MARK = Path(os.environ["ONCE_MARK"])


@subscribe(TOPIC, "g", subscription_type="failover", effectively_once=True, initial_position="earliest")
async def handle(n: int, bus: EventBus) -> None:
    for part in (1, 2):
        await bus.publish(f"{TOPIC}-out", {"n": n, "part": part}, key=str(n))
    if n == 3 and not MARK.exists():
        MARK.touch()
        os.kill(os.getpid(), signal.SIGKILL)
