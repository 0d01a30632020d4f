"""Java and Go services on the bus's topics: tests/interop/ on the official clients, with Pulsar's schemas.

Java runs in every Pulsar run; Go (tests/interop/go, pulsar-client-go 0.19.0 from the Go module proxy: a
first build takes about 2 minutes) runs the same scenarios with EB_INTEROP_GO=1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict

from eventbus import ConfigError, EventBus, Message, PublishError, Router, Settings
from eventbus.operating import replay

from .conftest import ROOT, admin_urls, eventually, read_stored, running
from .pulsar_admin import admin

pytestmark = pytest.mark.pulsar



@dataclass(frozen=True)
class Peer:
    """A program of another language's service: `peer(mode, *args)` runs one of its modes (the same in both)."""

    name: str
    command: list[str]
    pulsar: dict

    def __call__(self, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command, mode, self.pulsar["service_url"], self.pulsar["client_token"], *args],
            capture_output=True, text=True, timeout=120,
        )

    async def started(self, mode: str, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
        """A mode running in the background once it printed its ready row, and the lines it printed until then."""
        command = [*self.command, mode, self.pulsar["service_url"], self.pulsar["client_token"], *args]
        process = await anyio.to_thread.run_sync(lambda: subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        assert process.stdout is not None
        before: list[str] = []
        while not (line := await anyio.to_thread.run_sync(process.stdout.readline)).startswith('ROW {"ready":true}'):
            assert line, f"{mode} ended before it was ready: {process.stderr.read() if process.stderr else ''}"
            before.append(line)
        return process, before


class Reading(BaseModel):
    """The payload Interop.java's `Reading` class holds: the same fields, a Java team's plain class."""

    sensor: str
    value: float
    seq: int
    note: str | None = None


@pytest.fixture(scope="session")
def java(pulsar: dict, tmp_path_factory: pytest.TempPathFactory) -> Peer:
    """Interop.java compiled against the Java client scripts/pulsar-standalone resolved."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from pulsarkit import java_for  # type: ignore[import-not-found]

    java_bin = Path(java_for(pulsar["version"]))
    javac = java_bin.with_name("javac")
    if not javac.exists():
        javac = Path(shutil.which("javac") or "javac")
    classes = tmp_path_factory.mktemp("interop")
    subprocess.run(
        [str(javac), "-d", str(classes), "-cp", pulsar["classpath"], str(ROOT / "tests" / "interop" / "Interop.java")],
        check=True, capture_output=True, text=True, timeout=180,
    )
    return Peer("java", [str(java_bin), "-cp", f"{classes}:{pulsar['classpath']}", "Interop"], pulsar)


@pytest.fixture(scope="session")
def go(pulsar: dict, tmp_path_factory: pytest.TempPathFactory) -> Peer:
    """tests/interop/go built with the machine's Go (EB_INTEROP_GO=1: CI's 30 minutes leave no room for its build)."""
    if os.environ.get("EB_INTEROP_GO") != "1":
        pytest.skip("the Go peer runs with EB_INTEROP_GO=1 (docs/how-to/java-and-go.md)")
    binary = tmp_path_factory.mktemp("interop-go") / "interop"
    subprocess.run(
        ["go", "build", "-o", str(binary), "."], cwd=ROOT / "tests" / "interop" / "go",
        check=True, capture_output=True, text=True, timeout=900,
    )
    return Peer("go", [str(binary)], pulsar)


@pytest.fixture(params=["java", "go"])
def peer(request: pytest.FixtureRequest) -> Peer:
    """Each test once with the Java service, once with the Go one."""
    return request.getfixturevalue(request.param)


def rows(done: subprocess.CompletedProcess[str]) -> list[dict]:
    """What the peer printed (its "ROW " lines: the Java client logs on stdout too)."""
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW {")]


@pytest.fixture
def psettings(pulsar: dict) -> Settings:
    return Settings(_env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], shutdown_drain_timeout=10)


async def _publish_readings(settings: Settings, topic: str, count: int) -> list[Reading]:
    router = Router()
    router.publisher(topic, Reading)
    sent = [Reading(sensor=f"s-{i % 2}", value=i / 4, seq=i, note=None if i % 2 else "even") for i in range(count)]
    async with EventBus(settings, routers=[router]) as bus:
        for reading in sent:
            await bus.publish(topic, reading, key=reading.sensor, properties={"origin": "python"},
                              event_time=1_700_000_000_000 + reading.seq)
    return sent


async def test_a_java_consumer_with_a_json_schema_reads_a_topic_the_bus_created(
    psettings: Settings, topic: str, peer: Peer
) -> None:
    """Before: `IncompatibleSchemaException: Failed to add schema to an active topic with empty(BYTES) schema`."""
    sent = await _publish_readings(psettings, topic, 5)
    done = peer("consume-json", psettings.topic(topic), f"{peer.name}-service", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    got = rows(done)
    assert [(g["key"], g["properties"], g["event_time"], g["sensor"], g["value"], g["seq"], g["note"]) for g in got] == [
        (r.sensor, {"origin": "python", "content-type": "application/json"}, 1_700_000_000_000 + r.seq,
         r.sensor, r.value, r.seq, r.note or "null")  # Interop.java prints a null field as "null"
        for r in sent
    ]


async def test_a_schema_enforcing_namespace_takes_declared_payloads_and_refuses_untyped_ones_by_name(
    pulsar: dict, peer: Peer
) -> None:
    """`schemaValidationEnforced`: a declared model's publishes are stored (and read by Java); a dict to that topic,
    which now has a schema, is refused naming it (a topic without one takes anything, enforced or not)."""
    namespace = f"enforced-{uuid.uuid4().hex[:6]}"
    admin(pulsar, "PUT", f"/admin/v2/namespaces/public/{namespace}")
    admin(pulsar, "POST", f"/admin/v2/namespaces/public/{namespace}/permissions/client", ["produce", "consume"])
    admin(pulsar, "POST", f"/admin/v2/namespaces/public/{namespace}/schemaValidationEnforced", True)
    settings = Settings(_env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], namespace=namespace)
    await _publish_readings(settings, "readings", 3)
    done = peer("consume-json", settings.topic("readings"), f"{peer.name}-service", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["seq"] for row in rows(done)] == [0, 1, 2]
    async with EventBus(settings) as bus:
        with pytest.raises((ConfigError, PublishError)) as refused:
            await bus.publish("readings", {"seq": 1})
    text = str(refused.value)
    assert "\n" not in text and text.count("without a schema") == 1 and "org.apache" not in text, text
    assert "Router.publisher(topic, Model)" in text


class ReadingWithUnit(BaseModel):
    """`Reading` with a required field more: a change Pulsar's default (FULL) compatibility refuses."""

    model_config = ConfigDict(title="Reading")
    sensor: str
    value: float
    seq: int
    unit: str


async def test_an_incompatible_model_change_is_refused_with_the_brokers_reason_in_one_line(
    psettings: Settings, topic: str
) -> None:
    await _publish_readings(psettings, topic, 1)
    router = Router()
    router.publisher(topic, ReadingWithUnit)
    async with EventBus(psettings, routers=[router]) as bus:
        with pytest.raises((ConfigError, PublishError)) as refused:
            await bus.publish(topic, ReadingWithUnit(sensor="s", value=1, seq=1, unit="C"))
    text = str(refused.value)
    assert "IncompatibleSchema" in text and "\n" not in text and "org.apache" not in text, text
    assert "strategy FULL" in text and "Router.publisher(topic, Model)" in text


async def test_a_java_producers_json_with_its_nulls_left_out_reaches_a_typed_handler_whole(
    psettings: Settings, topic: str, peer: Peer
) -> None:
    """Java's `Schema.JSON` leaves null fields out: a model whose optional fields default to None takes them all."""
    got: list[tuple[Reading, str | None, dict[str, str], int]] = []
    router = Router()

    @router.subscribe(topic, "python-service", initial_position="earliest")
    async def record(reading: Reading, msg: Message) -> None:
        assert msg.event_time is not None
        got.append((reading, msg.key, msg.properties, int(msg.event_time.timestamp() * 1000)))

    done = peer("produce-json", psettings.topic(topic), "6")
    assert done.returncode == 0 and "ROW sent 6" in done.stdout, done.stderr[-2000:]
    async with EventBus(psettings, routers=[router]) as bus, running(bus):
        await eventually(lambda: len(got) >= 6)
    assert sorted(got, key=lambda g: g[0].seq) == [
        (Reading(sensor=f"sensor-{i % 3}", value=i * 1.5, seq=i, note=None if i % 2 == 0 else "odd"), f"sensor-{i % 3}",
         {"origin": peer.name}, 1_700_000_000_000 + i)
        for i in range(6)
    ]


async def test_a_java_avro_producers_records_reach_typed_handlers_decoded_and_a_str_handler_refuses_them(
    psettings: Settings, topic: str, peer: Peer
) -> None:
    """Before: 6 of 6 dead-lettered `undecodable: ... Invalid JSON` for the model; the `str` handler "handled" binary."""
    typed: list[Reading] = []
    as_dict: list[dict] = []
    texts: list[str] = []
    router = Router()

    @router.subscribe(topic, "typed", initial_position="earliest")
    async def read_typed(reading: Reading) -> None:
        typed.append(reading)

    @router.subscribe(topic, "untyped", initial_position="earliest")
    async def read_dict(reading: dict) -> None:
        as_dict.append(reading)

    @router.subscribe(topic, "text", initial_position="earliest")
    async def read_text(text: str) -> None:
        texts.append(text)

    done = peer("produce-avro", psettings.topic(topic), "6")
    assert done.returncode == 0 and "ROW sent 6" in done.stdout, done.stderr[-2000:]
    dead: list[Message] = []
    check = Router()

    @check.subscribe(psettings.topic(topic) + "-text-DLQ", "check", initial_position="earliest")
    async def read_dead(data: bytes, msg: Message) -> None:
        dead.append(msg)

    async with EventBus(psettings, routers=[router, check]) as bus, running(bus):
        await eventually(lambda: len(typed) >= 6 and len(as_dict) >= 6 and len(dead) >= 6)
    expected = [Reading(sensor=f"sensor-{i % 3}", value=i * 1.5, seq=i, note=None if i % 2 == 0 else "odd") for i in range(6)]
    assert sorted(typed, key=lambda r: r.seq) == expected
    assert sorted(as_dict, key=lambda r: r["seq"]) == [r.model_dump() for r in expected]
    assert texts == []
    reasons = {m.properties.get("eventbus-error") for m in dead}
    assert len(reasons) == 1 and "an AVRO payload (schema Interop.Reading)" in reasons.pop()


async def test_the_bus_refuses_to_publish_json_into_an_avro_topic_and_stores_nothing_there(
    pulsar: dict, psettings: Settings, topic: str, peer: Peer
) -> None:
    """Before: stored as JSON, and the Java `Schema.AVRO` consumer threw on every one: the topic poisoned."""
    done = peer("produce-avro", psettings.topic(topic), "2")
    assert done.returncode == 0, done.stderr[-2000:]
    async with EventBus(psettings) as bus:
        for payload in (Reading(sensor="s", value=1, seq=9), {"sensor": "s"}, b"raw"):
            with pytest.raises(ConfigError) as refused:
                await bus.publish(topic, payload)
            text = str(refused.value)
            assert "its registered schema is AVRO" in text and "\n" not in text, text
    assert sum(len(ids) for ids in read_stored(pulsar["service_url"], pulsar["client_token"], psettings.topic(topic)).values()) == 2


@pytest.mark.parametrize("batcher", ["default", "key-based"])
async def test_a_batch_of_several_keys_from_another_producer_is_warned_about_once_naming_the_fix(
    psettings: Settings, topic: str, peer: Peer, batcher: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Java's default batcher puts several keys in a batch, which key_shared dispatches by its first key."""
    got: list[str] = []
    router = Router()

    @router.subscribe(topic, "ordered", initial_position="earliest")
    async def handle(text: str) -> None:
        got.append(text)

    done = peer("produce-batched", psettings.topic(topic), "200", batcher)
    assert done.returncode == 0, done.stderr[-2000:]
    with caplog.at_level(logging.WARNING, "eventbus"):
        async with EventBus(psettings.model_copy(update={"metrics": True}), routers=[router]) as bus, running(bus):
            await eventually(lambda: len(got) >= 200)
            assert bus.metrics is not None
            mixed = bus.metrics.subscription(psettings.topic(topic), "ordered").mixed_key_batches
            scraped = generate_latest(bus.metrics.registry).decode()
    warned = [r.getMessage() for r in caplog.records if "several keys" in r.getMessage()]
    if batcher == "default":
        assert len(warned) == 1 and "BatcherBuilder.KEY_BASED" in warned[0] and topic in warned[0], warned
        assert mixed >= 1 and f'eventbus_mixed_key_batches_total{{group="ordered",topic="{psettings.topic(topic)}"}} {mixed}.0' in scraped
    else:
        assert warned == [] and mixed == 0
    assert sorted(got, key=int) == [str(i) for i in range(200)]


def test_eventbus_schemas_tells_a_deploy_pipeline_whether_the_models_may_follow_the_registry(
    pulsar: dict, base_env: dict[str, str], topic: str, tmp_path: Path
) -> None:
    """The registry holds `Reading` (the bus published it): the same model passes, a required field more fails."""
    settings = Settings(_env_file=None, url=pulsar["service_url"], token=pulsar["client_token"])
    anyio.run(_publish_readings, settings, topic, 1)
    env = {**base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"],
           "EVENTBUS_ADMIN_URL": admin_urls(pulsar), "EVENTBUS_ADMIN_TOKEN": pulsar["admin_token"],
           "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    for name, model in (("same_app", "Reading"), ("changed_app", "ReadingWithUnit")):
        (tmp_path / f"{name}.py").write_text(
            f"from eventbus import Router\nfrom tests.test_interop import {model}\n"
            f"router = Router()\nrouter.publisher({topic!r}, {model})\n"
        )
    same = subprocess.run([sys.executable, "-m", "eventbus", "schemas", "same_app:router"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"{settings.topic(topic)}  Reading  registered: JSON v0  same" in same.stdout
    changed = subprocess.run([sys.executable, "-m", "eventbus", "schemas", "changed_app:router"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "registered: JSON v0  INCOMPATIBLE (FULL)" in changed.stdout
    assert "1 model(s) the registry would refuse" in changed.stderr


async def test_a_java_or_go_consumer_reads_the_dead_letters_with_their_key_event_time_and_reason(
    psettings: Settings, topic: str, peer: Peer
) -> None:
    """A dead-letter topic carries no schema: another service reads it as bytes (Java `Schema.BYTES`, Go's default)."""
    router = Router()

    @router.subscribe(topic, "billing", max_retries=0)
    async def bill(reading: Reading) -> None:
        raise ValueError(f"cannot bill {reading.seq}")

    async with EventBus(psettings, routers=[router]) as bus, running(bus):
        for seq in range(3):
            await bus.publish(topic, Reading(sensor="s", value=1, seq=seq), key=f"k{seq}", event_time=1_700_000_000_000 + seq)
        dead_letters = psettings.topic(topic) + "-billing-DLQ"
        done = await anyio.to_thread.run_sync(lambda: peer("consume-bytes", dead_letters, f"{peer.name}-dlq", "3"))
    assert done.returncode == 0, done.stderr[-2000:]
    got = sorted(rows(done), key=lambda g: g["key"])
    assert [(g["key"], g["event_time"], json.loads(g["payload"])["seq"]) for g in got] == [
        (f"k{seq}", 1_700_000_000_000 + seq, seq) for seq in range(3)
    ]
    for g in got:
        assert g["properties"]["eventbus-dlq-reason"] == "handler-failed" and g["properties"]["REAL_TOPIC"] == psettings.topic(topic)
        assert (g["properties"]["eventbus-error-type"], g["properties"]["eventbus-error"]) == (
            "ValueError", f"cannot bill {json.loads(g['payload'])['seq']}")


async def test_a_dead_letter_of_an_avro_record_is_replayed_and_read_as_avro_again(
    psettings: Settings, topic: str, peer: Peer
) -> None:
    """A dead letter keeps the record's bytes and names its writer's schema version (`eventbus-schema-version`), so
    the replayed copy, stored schemaless on the retry topic, is read with the original topic's definition.

    Before: the copy was read as JSON and dead-lettered again, `undecodable: ... Invalid JSON`."""
    failing = True
    handled: list[Reading] = []
    router = Router()

    @router.subscribe(topic, "billing", max_retries=0, initial_position="earliest")
    async def bill(reading: Reading) -> None:
        if failing:
            raise ValueError(f"cannot bill {reading.seq} yet")
        handled.append(reading)

    dead: list[Message] = []
    check = Router()

    @check.subscribe(psettings.topic(topic) + "-billing-DLQ", "check", initial_position="earliest")
    async def read_dead(data: bytes, msg: Message) -> None:
        dead.append(msg)

    done = peer("produce-avro", psettings.topic(topic), "3")
    assert done.returncode == 0 and "ROW sent 3" in done.stdout, done.stderr[-2000:]
    async with EventBus(psettings, routers=[router, check]) as bus, running(bus):
        await eventually(lambda: len(dead) >= 3)
    assert {m.properties.get("eventbus-schema-version") for m in dead} == {"0"}
    failing = False
    report = await replay.replay(psettings, topic, "billing")
    assert len(report.replayed) == 3 and not report.failed, report
    async with EventBus(psettings, routers=[router, check]) as bus, running(bus):
        await eventually(lambda: len(handled) >= 3 or len(dead) > 3)
    assert len(dead) == 3, [m.properties.get("eventbus-error") for m in dead[3:]]
    expected = [Reading(sensor=f"sensor-{i % 3}", value=i * 1.5, seq=i, note=None if i % 2 == 0 else "odd") for i in range(3)]
    assert sorted(handled, key=lambda r: r.seq) == expected


async def test_a_java_key_shared_consumer_and_a_worker_share_a_group_each_key_whole_and_in_order_on_one(
    psettings: Settings, topic: str, java: Peer
) -> None:
    """A Java service's Key_Shared consumer and an eventbus worker in one group (the bus's key-based batches)."""
    took: list[tuple[str, int]] = []
    router = Router()

    @router.subscribe(topic, "shared-g")  # key_shared
    async def take(n: int, msg: Message) -> None:
        took.append((str(msg.key), n))

    process, _ = await java.started("consume-keyshared", psettings.topic(topic), "shared-g", "5")
    async with EventBus(psettings, routers=[router]) as bus, running(bus):
        await asyncio.gather(*(bus.publish(topic, n, key=f"k{n % 32}") for n in range(320)))  # in order per key
        out, err = await anyio.to_thread.run_sync(lambda: process.communicate(timeout=120))
        assert process.returncode == 0, err[-2000:]
        java_took = [(row["key"], int(row["payload"])) for row in rows(subprocess.CompletedProcess([], 0, out, err))]
        await eventually(lambda: len(took) + len(java_took) >= 320)
    assert sorted(n for _, n in took + java_took) == list(range(320)), "each message once, to one of them"
    assert took and java_took, "both members took keys"
    for side in (took, java_took):
        for key in {k for k, _ in side}:
            assert [n for k, n in side if k == key] == sorted(n for k, n in side if k == key), f"{key} in order"
    assert not {k for k, _ in took} & {k for k, _ in java_took}, "a key to one member only"


async def test_a_group_a_java_service_holds_as_shared_is_one_error_then_joined_once_it_leaves(
    psettings: Settings, topic: str, java: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the bus said it stood by 'for another member' and waited, while the client logged ConsumerBusy."""
    handled: list[int] = []
    router = Router()

    @router.subscribe(topic, "g")  # key_shared
    async def take(n: int) -> None:
        handled.append(n)

    process, _ = await java.started("hold-shared", psettings.topic(topic), "g")
    with caplog.at_level(logging.INFO, logger="eventbus"):
        async with EventBus(psettings, routers=[router]) as bus, running(bus):
            def refused() -> list[logging.LogRecord]:
                return [r for r in caplog.records if "cannot join group g" in r.getMessage()]

            await eventually(refused, what="the ERROR naming the other subscription type")
            assert process.stdin is not None
            process.stdin.close()
            await anyio.to_thread.run_sync(lambda: process.wait(60))
            await bus.publish(topic, 7)
            await eventually(lambda: handled == [7], timeout=60, what="the worker to join once Java left")
    [error] = refused()
    assert error.levelname == "ERROR" and "give every member the same subscription_type" in error.getMessage()


async def test_a_chunked_message_from_java_is_named_by_its_first_and_last_chunk_as_java_names_it(
    pulsar: dict, psettings: Settings, topic: str, java: Peer
) -> None:
    """Java's producer splits a large message into chunks and names it `first;last`; the bus reported the last
    chunk's id alone, which no tool of Java's can seek to or look up as the message. Every chunk is acknowledged."""
    seen: dict[int, str] = {}
    router = Router()

    @router.subscribe(topic, "billing", max_retries=0, initial_position="earliest")
    async def bill(order: dict, msg: Message) -> None:
        seen[order["seq"]] = str(msg.message_id)
        if order["seq"] == 1:
            raise ValueError("cannot bill 1")

    dead: list[Message] = []
    check = Router()

    @check.subscribe(psettings.topic(topic) + "-billing-DLQ", "check", initial_position="earliest")
    async def read_dead(data: bytes, msg: Message) -> None:
        dead.append(msg)

    done = java("produce-chunked", psettings.topic(topic), "3", "2500")
    assert done.returncode == 0, done.stderr[-2000:]
    java_ids = {row["seq"]: row["id"] for row in rows(done)}
    assert all(";" in java_id for java_id in java_ids.values()), java_ids  # chunked: `ledger:entry:partition;...`
    async with EventBus(psettings, routers=[router, check]) as bus, running(bus):
        await eventually(lambda: len(seen) == 3 and len(dead) == 1)
    as_java = {seq: ";".join(part.rsplit(":", 1)[0] for part in ours.split(";")) for seq, ours in seen.items()}
    assert as_java == java_ids
    assert dead[0].properties["eventbus-original-message-id"] == dead[0].properties["ORIGIN_MESSAGE_ID"] == seen[1]
    stats = admin(pulsar, "GET", f"/admin/v2/persistent/{psettings.topic(topic).split('://')[1]}/stats")
    assert stats["subscriptions"]["billing"]["msgBacklog"] == 0 and stats["subscriptions"]["billing"]["unackedMessages"] == 0
