"""What operators read: standby said once naming the holder, each worker's lines numbered, tables aligned, counts right."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from eventbus import Router, Settings
from eventbus.testing import Harness

from .conftest import eventually
from .test_worker_process import Worker, cli

_TWO_GROUPS = """
import os
from eventbus import Router

router = Router()
for group in ("billing", "audit", "search"):
    router.subscribe(os.environ["EB_TOPIC"], group)(lambda n: None)
"""


async def test_a_second_worker_on_the_embedded_broker_says_standby_once_naming_the_holder(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path, broker_kind: str
) -> None:
    if broker_kind != "embedded":
        pytest.skip("the embedded broker's leases: Apache Pulsar shares a subscription among workers")
    (tmp_path / "groups.py").write_text(_TWO_GROUPS)
    env = {**subprocess_env, "EB_TOPIC": topic, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    first = Worker(env, tmp_path / "first.log", "groups:router")
    second: Worker | None = None
    try:
        await first.wait_subscribed()
        second = Worker(env, tmp_path / "second.log", "groups:router")
        await eventually(lambda: "standby" in second.text(), timeout=30, what="the second worker standing by")
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit(30) == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
    lines = [line for line in second.text().splitlines() if "standby" in line]
    assert len(lines) == 1, lines  # six subscriptions (three groups, their retry topics) stand by
    assert " WARNING " in lines[0] and f"standby: process {first.proc.pid} consumes" in lines[0]


async def test_each_worker_of_workers_n_numbers_its_lines(
    topic: str, subprocess_env: dict[str, str], tmp_path: Path, broker_kind: str
) -> None:
    if broker_kind != "embedded":
        pytest.skip("the numbering is the supervisor's, whatever the broker")
    (tmp_path / "groups.py").write_text(_TWO_GROUPS)
    env = {**subprocess_env, "EB_TOPIC": topic, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    supervisor = Worker(env, tmp_path / "supervisor.log", "groups:router", "--workers", "2")
    try:
        await eventually(
            lambda: "]: subscribed" in supervisor.text() and "]: standby" in supervisor.text(),
            timeout=60, what="both workers' lines, numbered",
        )
        supervisor.proc.send_signal(signal.SIGTERM)
        assert await supervisor.wait_exit(60) == 0, supervisor.text()
    finally:
        supervisor.kill()
    text = supervisor.text()
    workers = {m.group(1) for m in re.finditer(r"eventbus\[worker (\d)\]: ", text)}
    assert workers == {"0", "1"}
    # The two take the six subscriptions' leases as they come: each says standby once at most.
    standby = [re.search(r"\[worker (\d)\]", line).group(1) for line in text.splitlines() if "standby" in line]  # type: ignore[union-attr]
    assert standby and sorted(set(standby)) == sorted(standby), text


async def test_dlq_show_says_when_the_limit_cut_the_list_and_a_dry_run_says_would_replay(
    settings: Settings, topic: str, subprocess_env: dict[str, str]
) -> None:
    router = Router()

    @router.subscribe(topic, "billing", initial_position="earliest", max_retries=0)
    async def fail(n: int) -> None:
        raise ValueError(f"cannot bill {n}")

    async with Harness(settings, [router]) as app:
        for n in range(5):
            await app.publish(topic, n)
        await app.wait_dead_lettered(5, group="billing", timeout=20)
    shown = cli(subprocess_env, "dlq", "show", topic, "billing", "--limit", "3")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 3, shown.stderr
    assert "the first 3 (--limit 3; more may wait) dead letter(s) not replayed" in shown.stderr, shown.stderr
    every = cli(subprocess_env, "dlq", "show", topic, "billing", "--limit", "10")
    assert every.stderr.splitlines()[-1].startswith("5 dead letter(s) not replayed"), every.stderr
    dry = cli(subprocess_env, "dlq", "replay", topic, "billing", "--dry-run")
    printed = dry.stdout.splitlines()
    assert len(printed) == 5 and all(line.startswith("would replay ") for line in printed), dry.stdout
    assert "would replay 5 dead letter(s)" in dry.stderr


async def test_status_columns_line_up_whatever_the_names_are_long(
    settings: Settings, topic: str, subprocess_env: dict[str, str]
) -> None:
    long_topic = f"{topic}-orders-for-the-northern-european-region-warehouse"
    router = Router()
    router.subscribe(long_topic, "a-group-with-a-long-name-too")(lambda n: None)
    async with Harness(settings, [router]) as app:  # the subscription exists from now on
        await app.publish(long_topic, 1)
        await app.wait_handled(topic=long_topic, timeout=20)
    shown = cli(subprocess_env, "status", "--topic", long_topic, "--group", "a-group-with-a-long-name-too")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()[:2]
    assert header.index("group") == row.index("a-group-with-a-long-name-too"), shown.stdout
    assert header.split()[0] == "topic" and row.split()[0] == settings.topic(long_topic)


def test_publish_from_a_path_refuses_devices_and_files_over_the_message_limit(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    big = tmp_path / "big.json"
    big.write_text('"' + "a" * (5 * 1024 * 1024) + '"')
    for path, said in [
        ("/dev/zero", "not a regular file"),  # it never ended
        (str(big), "over Apache Pulsar's default message limit of 5,242,880"),
        (str(tmp_path / "missing.json"), "No such file or directory"),
    ]:
        result = cli(base_env, "publish", "orders", f"@{path}", timeout=30)
        assert result.returncode == 2 and said in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
