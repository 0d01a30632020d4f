"""The example app in handlers/, tested the way the tutorial tells a team to test theirs (eventbus.testing)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone

from eventbus.testing import Harness, call_handler
from handlers.pipeline import Record, aggregate, database
from handlers.workflow import EVENTS_TOPIC, STEPS_TOPIC, StepEvent, WorkflowStep, run_step


async def test_a_workflow_run_is_stepped_in_order_and_completed(eventbus_app: Harness) -> None:
    for step in (1, 2, 3):
        await eventbus_app.publish(STEPS_TOPIC, WorkflowStep(run_id="r1", step=step, total=3, action=f"a{step}"), key="r1")

    handled = await eventbus_app.wait_handled(3, topic=STEPS_TOPIC)
    assert [h.payload.step for h in handled] == [1, 2, 3]
    events = await eventbus_app.wait_published(4, topic=EVENTS_TOPIC)
    assert [(e.payload.step, e.payload.status) for e in events] == [(1, "done"), (2, "done"), (3, "done"), (3, "run-completed")]
    assert {e.key for e in events} == {"r1"}
    # The audit handler consumes those events in turn.
    audited = await eventbus_app.wait_handled(4, topic=EVENTS_TOPIC, group="workflow-audit")
    assert audited[-1].payload == StepEvent(run_id="r1", step=3, status="run-completed")


async def test_an_invalid_record_is_dead_lettered_with_the_reason(eventbus_app: Harness) -> None:
    await eventbus_app.publish("pipeline.records", {"source": "s", "metric": "m", "value": -1, "at": "2026-11-30T00:00:00Z"})

    [dead] = await eventbus_app.wait_dead_lettered(topic="pipeline.records")
    assert (dead.group, dead.reason) == ("pipeline-aggregator", "undecodable")
    assert "value: Input should be greater than or equal to 0" in dead.error
    assert eventbus_app.handled[-1].outcome == "invalid_payload"


async def test_a_step_publishes_its_event_without_a_broker() -> None:
    result = await call_handler(run_step, WorkflowStep(run_id="unit-1", step=1, total=1, action="only"), key="unit-1")

    assert result.ok, result.error
    assert [(p.topic, p.payload.status) for p in result.published] == [
        ("persistent://public/default/workflow.events", "done"),
        ("persistent://public/default/workflow.events", "run-completed"),
    ]


async def test_records_are_added_up_in_the_database_a_batch_at_a_time() -> None:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("create table totals (key text primary key, total real not null)")

    def test_database() -> Iterator[sqlite3.Connection]:
        yield db

    at = datetime(2026, 11, 30, tzinfo=timezone.utc)
    records = [Record(source="s", metric="m", value=v, at=at) for v in (1, 2.5, 3)]
    result = await call_handler(aggregate, records, dependencies={database: test_database})
    assert result.ok and db.execute("select key, total from totals").fetchall() == [("s/m", 6.5)]

    invalid = await call_handler(aggregate, [b'{"source": "s", "metric": "m", "value": -1}'])
    assert (invalid.outcome, invalid.reason) == ("dead_letter", "undecodable")
