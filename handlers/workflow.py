"""Workflow runs: each step of a run is handled in order, keyed by run id."""

from __future__ import annotations

import logging

from pydantic import BaseModel, Field

from eventbus import EventBus, Message, publisher, subscribe

log = logging.getLogger("handlers.workflow")

STEPS_TOPIC = "workflow.steps"
EVENTS_TOPIC = "workflow.events"


class WorkflowStep(BaseModel):
    run_id: str
    step: int = Field(ge=1)
    total: int = Field(ge=1)
    action: str


class StepEvent(BaseModel):
    run_id: str
    step: int
    status: str


publisher(EVENTS_TOPIC, StepEvent, description="A step of a run is done; the last one also says the run completed.")

# Last step seen per run: shows the per-key order the subscription promises.
_last_step: dict[str, int] = {}


@subscribe(STEPS_TOPIC, "workflow-runner", concurrency=4, initial_position="earliest")
async def run_step(step: WorkflowStep, msg: Message, bus: EventBus) -> None:
    """Runs one step of a workflow run, in step order per run, and announces it on workflow.events."""
    previous = _last_step.get(step.run_id, 0)
    if step.step <= previous:
        log.info("run %s: step %d already done (redelivery), skipping", step.run_id, step.step)
        return
    if step.step != previous + 1:
        log.warning("run %s: step %d arrived after step %d", step.run_id, step.step, previous)
    _last_step[step.run_id] = step.step
    log.info("run %s: step %d/%d %r done", step.run_id, step.step, step.total, step.action)
    await bus.publish(EVENTS_TOPIC, StepEvent(run_id=step.run_id, step=step.step, status="done"), key=step.run_id)
    if step.step == step.total:
        _last_step.pop(step.run_id, None)
        await bus.publish(EVENTS_TOPIC, StepEvent(run_id=step.run_id, step=step.step, status="run-completed"), key=step.run_id)


@subscribe(EVENTS_TOPIC, "workflow-audit", initial_position="earliest")
async def audit(event: StepEvent) -> None:
    """Logs each completed run."""
    if event.status == "run-completed":
        log.info("run %s completed after %d steps", event.run_id, event.step)
