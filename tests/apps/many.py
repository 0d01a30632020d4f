"""A worker of EB_COUNT subscriptions, one topic each (EB_TOPIC-0 ...), recording "<topic> <n>" lines in EB_RECORD."""

from __future__ import annotations

import os

from eventbus import Message, Router

_OUT = os.open(os.environ["EB_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

router = Router()


async def record(n: int, msg: Message) -> None:
    os.write(_OUT, f"{msg.topic} {n}\n".encode())  # one write: whole lines, whatever the order


for _i in range(int(os.environ["EB_COUNT"])):
    router.subscribe(f"{os.environ['EB_TOPIC']}-{_i}", "many", initial_position="earliest")(record)
