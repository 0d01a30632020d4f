"""Demo events for the example app.

As a module of the worker (``python -m eventbus run handlers handlers.demo``)
it publishes a few events a second from inside the worker. On its own
(``python -m handlers.demo --count 20``) it is a separate publisher process
that joins the same embedded broker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
from datetime import datetime, timezone

import anyio

from eventbus import EventBus, default_router

from . import agents, pipeline, workflow

log = logging.getLogger("handlers.demo")



async def publish_round(bus: EventBus, n: int) -> None:
    run_id = f"run-{n}"
    total = 3
    await bus.publish_batch(
        workflow.STEPS_TOPIC,
        [workflow.WorkflowStep(run_id=run_id, step=s, total=total, action=a)
         for s, a in zip(range(1, total + 1), ["fetch", "transform", "store"])],
        key=run_id,
    )
    await bus.publish(agents.TOPIC, {"from": "planner", "to": "coder", "text": f"please handle {run_id}"})
    value = random.choice([1.5, 2.0, 3.25, -1.0])  # a negative value fails validation: dead-lettered
    await bus.publish(
        pipeline.TOPIC,
        {"source": "sensor-1", "metric": "load", "value": value, "at": datetime.now(timezone.utc).isoformat()},
        key="sensor-1",
    )


@default_router.run_in_background
async def feed(bus: EventBus) -> None:
    for n in itertools.count(1):
        await publish_round(bus, n)
        await anyio.sleep(1.0)


async def _main(count: int, interval: float) -> None:
    async with EventBus(routers=[]) as bus:
        for n in range(1, count + 1):
            await publish_round(bus, n)
            log.info("published round %d", n)
            await anyio.sleep(interval)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Publish demo events for the example handlers.")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("eventbus.pulsar").setLevel(logging.WARNING)
    asyncio.run(_main(args.count, args.interval))
