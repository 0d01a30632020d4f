"""The operator's odd inputs to `dlq` and `status`: wrong names create nothing, odd text stays on its line."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import SecretStr

from eventbus import Settings
from eventbus.operating.admin import namespace_topics
from eventbus.testing import Harness

from .test_dead_letters import failing
from .test_worker_process import cli, one_line_error

pytestmark = pytest.mark.slow


def _topics(settings: Settings, env: dict[str, str]) -> list[str] | None:
    return namespace_topics(settings.model_copy(update={
        "admin_url": env.get("EVENTBUS_ADMIN_URL", ""),
        "admin_token": SecretStr(env["EVENTBUS_ADMIN_TOKEN"]) if "EVENTBUS_ADMIN_TOKEN" in env else None,
    }))


async def test_a_wrong_topic_or_group_is_named_with_what_exists_and_nothing_is_created(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        await app.wait_dead_lettered()
    before = _topics(settings, subprocess_env)
    assert before is not None and settings.topic(topic) + "-billing-DLQ" in before
    full = settings.topic(topic)
    for args, words in [
        (["dlq", "show", topic, "bililng"], f"group 'bililng' never dead-lettered on {full} (no topic {full}-bililng-DLQ); "
                                           "groups with dead letters there: 'billing'"),
        (["dlq", "replay", topic, "bililng"], "groups with dead letters there: 'billing'"),
        (["dlq", "replay", topic + "x", "billing"], f"topic {full}x does not exist (its namespace has {full}"),
        (["dlq", "show", topic + "x", "billing", "--all"], f"topic {full}x does not exist"),
        (["status", "--topic", topic + "x", "--group", "billing"], f"{full}x does not exist"),
    ]:
        result = cli(subprocess_env, *args)
        assert result.returncode == 2 and words in one_line_error(result), (args, result.stderr)
    # New names only: Apache Pulsar deletes other tests' inactive topics (gone requesters' reply topics) meanwhile.
    after = _topics(settings, subprocess_env)
    assert after is not None and set(after) - set(before) == set(), "nothing was created"


async def test_text_output_escapes_control_characters_from_error_texts_and_keys(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    from eventbus import Router

    router = Router()

    @router.subscribe(topic, "billing", max_retries=0)
    async def billing(order: dict) -> None:
        raise ValueError("line one\nline two \x1b[31mred\x1b[0m \x00 \u202egnp.exe")

    async with Harness(settings, [router]) as app:
        await app.publish(topic, {"n": 0}, key="k\x1b[2J\r")
        await app.wait_dead_lettered()
    shown = cli(subprocess_env, "dlq", "show", topic, "billing")
    assert shown.returncode == 0, shown.stderr
    [line] = shown.stdout.splitlines()
    assert line.isprintable(), line
    assert "line one\\nline two \\x1b[31mred\\x1b[0m \\x00 \\u202egnp.exe" in line and "k\\x1b[2J\\r" in line
    replay = cli(subprocess_env, "dlq", "replay", topic, "billing", "--dry-run")
    assert [ln.isprintable() for ln in replay.stdout.splitlines()] == [True], replay.stdout


def test_one_shot_errors_are_our_line_alone(pulsar: dict, base_env: dict[str, str], topic: str) -> None:
    import pulsar as client_lib

    env = {**base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"]}
    client = client_lib.Client(pulsar["service_url"], authentication=client_lib.AuthenticationToken(pulsar["client_token"]))
    try:
        client.create_producer(f"persistent://public/default/{topic}", producer_name="held")
        busy = cli({**env, "EVENTBUS_PRODUCER_NAME": "held"}, "publish", topic, "1")
    finally:
        client.close()
    missing = cli({**env, "EVENTBUS_NAMESPACE": f"no-such-{uuid.uuid4().hex[:6]}"}, "publish", topic, "1")
    assert busy.returncode == 1 and "ProducerBusy" in one_line_error(busy)
    assert missing.returncode == 2 and "namespaces create public/no-such-" in one_line_error(missing)


async def test_show_status_and_metrics_agree_on_what_waits_after_a_filtered_replay(
    settings: Settings, subprocess_env: dict[str, str], topic: str, request: pytest.FixtureRequest
) -> None:
    from eventbus import Router

    router = Router()

    @router.subscribe(topic, "billing", max_retries=0)
    async def billing(order: dict) -> None:
        raise (KeyError if order["n"] else ValueError)(f"order {order['n']}")

    observed = settings.model_copy(update={"metrics": True})
    async with Harness(observed, [router]) as app:
        await app.publish(topic, {"n": 0})
        await app.publish(topic, {"n": 1})
        await app.wait_dead_lettered(2)
        assert app.bus.metrics is not None
        dead_lettered = app.bus.metrics.subscription(settings.topic(topic), "billing").dead_letters["ok"]
    replay = cli(subprocess_env, "dlq", "replay", topic, "billing", "--error-type", "KeyError")
    assert replay.returncode == 0 and replay.stdout.count("replayed ") == 1, replay.stderr

    shown = json.loads(cli(subprocess_env, "dlq", "show", topic, "billing", "--json").stdout)
    every = json.loads(cli(subprocess_env, "dlq", "show", topic, "billing", "--json", "--all").stdout)
    assert [(d["error_type"], d["replayed"]) for d in shown] == [("ValueError", False)]
    assert sorted((d["error_type"], d["replayed"]) for d in every) == [("KeyError", True), ("ValueError", False)]
    assert len(every) == dead_lettered == 2, "every one the worker counted is stored"
    text = cli(subprocess_env, "dlq", "show", topic, "billing", "--all")
    assert text.stdout.count("(replayed)") == 1 and "2 dead letter(s) stored, 1 of them replayed" in text.stderr

    env = dict(subprocess_env)
    status = cli(env, "status", "--topic", topic, "--group", "billing")
    assert status.returncode == 0, status.stderr
    if settings.url:
        assert "1 not replayed" in status.stdout, status.stdout
    else:
        assert status.stdout.splitlines()[1].split()[-1] == "1", status.stdout
