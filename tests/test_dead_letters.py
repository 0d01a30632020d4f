"""`eventbus dlq show|replay` and `eventbus status`, run as an operator runs them, checked against what the broker stored."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from typing import Any

import pytest

from eventbus import EventBus, Message, Router, Settings
from eventbus.operating import replay
from eventbus.broker.client import id_text
from eventbus.broker.embedded import SubscriptionLease
from eventbus.testing import Harness
from eventbus.topics import REPLAY_SUBSCRIPTION, REPLAYED_FROM

from .conftest import admin_urls, raw_client, read_messages, read_stored
from .pulsar_admin import admin
from .test_worker_process import cli, one_line_error

pytestmark = pytest.mark.slow


def shop(topic: str, fixed: dict[str, bool], handled: dict[str, list[int]]) -> Router:
    """Two groups on one topic: billing fails odd orders until fixed (and order 5 always); audit never fails."""
    router = Router()

    @router.subscribe(topic, "billing", max_retries=0)
    async def billing(order: dict, msg: Message) -> None:
        n = order["n"]
        if n == 5 or (n % 2 and not fixed["billing"]):
            raise ValueError(f"cannot bill order {n}")
        handled["billing"].append(n)

    @router.subscribe(topic, "audit")
    async def audit(order: dict) -> None:
        handled["audit"].append(order["n"])

    return router


def failing(topic: str) -> Router:
    """Group billing on `topic` dead-letters every message at its first failure."""
    router = Router()

    @router.subscribe(topic, "billing", max_retries=0)
    async def billing(order: dict) -> None:
        raise ValueError("no")

    return router


async def test_a_replay_sends_dead_letters_back_to_their_group_only_and_ends(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    settings = settings.model_copy(update={"namespace": "dedup"}) if settings.url else settings
    env = {**subprocess_env, "EVENTBUS_NAMESPACE": settings.namespace}
    fixed = {"billing": False}
    handled: dict[str, list[int]] = {"billing": [], "audit": []}
    router = shop(topic, fixed, handled)
    async with Harness(settings, [router]) as app:
        for n in range(8):
            await app.publish(topic, {"n": n}, key=f"k{n}", properties={"origin": "test"})
        dead = await app.wait_dead_lettered(4, group="billing")
        await app.wait_handled(8, group="audit")

        shown = cli(env, "dlq", "show", topic, "billing", "--json")
        assert shown.returncode == 0, shown.stderr
        listed = json.loads(shown.stdout)
        assert [(d["key"], d["reason"], d["error_type"], d["error"], d["attempts"]) for d in listed] == [
            (d.key, "handler-failed", "ValueError", f"cannot bill order {n}", 1) for d, n in zip(dead, (1, 3, 5, 7))
        ]
        assert all(d["properties"] == {"content-type": "application/json", "origin": "test"} for d in listed)
        assert cli(env, "dlq", "show", topic, "billing", "--json").stdout == shown.stdout  # a reader: nothing moved

        dry = cli(env, "dlq", "replay", topic, "billing", "--dry-run")
        assert dry.returncode == 0 and dry.stdout.count("(dry run)") == 4, dry.stdout + dry.stderr

        fixed["billing"] = True
        replay = cli(env, "dlq", "replay", topic, "billing")
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout.count("replayed ") == 4
        assert "replayed 4 dead letter(s) of group 'billing'" in replay.stderr
        await app.wait_handled(3, group="billing", topic=f"{topic}-billing-RETRY")
        # Order 5 fails again: dead-lettered again, after the replay's end, which the replay did not chase.
        await app.wait_dead_lettered(5, group="billing")
        again = cli(env, "dlq", "replay", topic, "billing")
        assert again.returncode == 0 and again.stdout.count("replayed ") == 1, again.stdout + again.stderr
        await app.wait_dead_lettered(6, group="billing")
        url = app.bus.url

    assert sorted(handled["billing"]) == [0, 1, 2, 3, 4, 6, 7]  # each once
    assert sorted(handled["audit"]) == list(range(8))  # the other group saw nothing again
    stored = read_stored(url, settings.jwt(), settings.topic(topic) + "-billing-RETRY")
    assert sorted(p for p, ids in stored.items() for _ in ids) == [b'{"n":1}', b'{"n":3}', b'{"n":5}', b'{"n":5}', b'{"n":7}']


async def test_a_replay_killed_half_way_and_run_again_resends_the_rest(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    """On Apache Pulsar with deduplication nothing is sent twice; elsewhere at least once."""
    on_pulsar = bool(settings.url)
    settings = settings.model_copy(update={"namespace": "dedup"}) if on_pulsar else settings
    env = {**subprocess_env, "EVENTBUS_NAMESPACE": settings.namespace}
    fixed = {"billing": False}
    handled: dict[str, list[int]] = {"billing": [], "audit": []}
    router = shop(topic, fixed, handled)
    total = 400
    async with Harness(settings, [router]) as app:
        await app.bus.publish_batch(topic, [{"n": 2 * i + 1} for i in range(total)])
        await app.wait_dead_lettered(total, group="billing", timeout=60)
        fixed["billing"] = True

        first = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "dlq", "replay", topic, "billing"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert first.stdout is not None
        printed = [first.stdout.readline() for _ in range(20)]
        first.send_signal(signal.SIGKILL)
        printed += first.stdout.readlines()
        assert first.wait() == -signal.SIGKILL
        assert all(line.startswith("replayed ") for line in printed), printed
        assert len(printed) < total, "killed half way"
        again = cli(env, "dlq", "replay", topic, "billing")
        if not on_pulsar and "may still hold the consumer of a replay that was killed" in again.stderr:
            # pulsar-lite's, seen about once in 40 runs on a loaded machine: it kept the killed replay's consumer
            # (and the dead letters it held) past the test's timeout. The docs' Guarantees, Left open, say so.
            pytest.xfail("pulsar-lite kept the SIGKILLed replay's consumer: " + again.stderr.strip().splitlines()[-1])
        assert again.returncode == 0, again.stderr
        # Acknowledgements travel grouped (the client sends them every 100 ms): a kill loses the last
        # ones, so some of what the killed replay sent is sent again; nothing is left out. The kill may also
        # land between a resend stored and its line printed: the run again finds that one stored and skips it.
        assert total - len(printed) - 1 <= again.stdout.count("replayed ") <= total
        await app.wait_handled(total - 1, group="billing", topic=f"{topic}-billing-RETRY", timeout=60)  # order 5 fails
        url = app.bus.url

    stored = read_stored(url, settings.jwt(), settings.topic(topic) + "-billing-RETRY")
    copies = {payload: len(ids) for payload, ids in stored.items()}
    assert set(copies) == {f'{{"n":{2 * i + 1}}}'.encode() for i in range(total)}
    if on_pulsar:
        assert set(copies.values()) == {1}, "deduplication drops the resend of what the killed replay sent"
    else:
        # Only what the killed replay sent (and the one it was sending) can be there twice.
        assert sum(copies.values()) - total <= len(printed) + 1


async def test_status_shows_backlog_consumers_and_dead_letters(pulsar: dict, settings: Settings, topic: str) -> None:
    if not settings.url:
        pytest.skip("the admin API is Apache Pulsar's")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent), "EVENTBUS_URL": settings.url,
           "EVENTBUS_TOKEN": pulsar["client_token"], "EVENTBUS_ADMIN_URL": admin_urls(pulsar),  # every broker's
           "EVENTBUS_ADMIN_TOKEN": pulsar["admin_token"]}
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        await app.wait_dead_lettered()
    async with EventBus(settings, routers=[]) as bus:
        for n in range(7):
            await bus.publish(topic, {"n": n})

    shown = cli(env, "status", "--topic", topic, "--group", "billing")
    assert shown.returncode == 0, shown.stderr
    row = shown.stdout.splitlines()[1].split()
    assert row[:6] == [settings.topic(topic), "billing", "Key_Shared", "7", "0", "0"], shown.stdout
    assert "1 not replayed" in shown.stdout
    assert row[8] in settings.url.split("://", 1)[1].split(","), "the owning broker named"
    if "brokers" in pulsar:  # the cluster: the broker its script finds owning the topic
        owner = subprocess.run([sys.executable, pulsar["script"], "owner", settings.topic(topic)],
                               capture_output=True, text=True).stdout.strip()
        assert row[8] == pulsar["brokers"][owner]["service_url"].split("://", 1)[1]

    for extra, args, code, words in [
        ({}, ["--topic", topic, "--group", "nobody"], 2, "group 'nobody' has no subscription on"),
        ({}, ["--topic", "no-such-topic", "--group", "g"], 2, "does not exist"),
        ({"EVENTBUS_ADMIN_TOKEN": pulsar["client_token"] + "x"}, ["--topic", topic, "--group", "billing"], 2,
         "refused the request (HTTP 401)"),
        ({"EVENTBUS_ADMIN_URL": "http://127.0.0.1:1"}, ["--topic", topic, "--group", "billing"], 1,
         "cannot reach the admin API at http://127.0.0.1:1"),
        ({}, ["--topic", topic], 2, "--topic and --group go together"),
    ]:
        result = cli({**env, **extra}, "status", *args)
        assert result.returncode == code and words in one_line_error(result), (args, result.stderr)


async def test_status_on_the_embedded_broker_counts_dead_letters_and_says_what_it_cannot_show(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    if settings.url:
        pytest.skip("the embedded broker's status")
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        await app.publish(topic, {"n": 1})
        await app.wait_dead_lettered(2)
    shown = cli(subprocess_env, "status", "--topic", topic, "--group", "billing")
    assert shown.returncode == 0, shown.stderr
    assert "the embedded broker has no admin API: backlog, unacknowledged messages" in shown.stderr
    assert shown.stdout.splitlines()[1].split() == [settings.topic(topic), "billing", "2"]


async def test_dead_letters_are_kept_by_a_subscription_of_their_own(
    settings: Settings, topic: str, request: pytest.FixtureRequest
) -> None:
    """Apache Pulsar keeps no message of a topic without a subscription (it deletes such a topic once idle)."""
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        [dead] = await app.wait_dead_lettered()
    if settings.url:
        path = "/admin/v2/" + dead.dead_letter_topic.replace("://", "/") + "/stats"
        stats: Any = admin(request.getfixturevalue("pulsar"), "GET", path)
        assert stats["subscriptions"]["eventbus-replay"]["msgBacklog"] == 1
    else:
        assert [d.message_id for d in await replay.show(settings, topic, "billing")] == [id_text(dead.message_id)]


async def test_a_replay_whose_resends_are_refused_fails_in_one_line_and_leaves_the_dead_letters(
    settings: Settings, subprocess_env: dict[str, str], topic: str, request: pytest.FixtureRequest
) -> None:
    if not settings.url:
        pytest.skip("terminating a topic takes Apache Pulsar's admin API")
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        await app.publish(topic, {"n": 1})
        await app.wait_dead_lettered(2)
    retry = settings.topic(topic) + "-billing-RETRY"
    admin(request.getfixturevalue("pulsar"), "POST", "/admin/v2/" + retry.replace("://", "/") + "/terminate")

    result = cli(subprocess_env, "dlq", "replay", topic, "billing")
    assert result.returncode == 1 and "TopicTerminated" in one_line_error(result), result.stderr
    assert len(await replay.show(settings, topic, "billing")) == 2
    dry = cli(subprocess_env, "dlq", "replay", topic, "billing", "--dry-run")
    assert dry.stdout.count("(dry run)") == 0 and dry.returncode == 1  # the producer comes first, even for a dry run


async def test_a_second_replay_of_a_group_at_once_is_refused(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        await app.wait_dead_lettered()
        url = app.bus.url
    dead_letters, retries = replay.topics(settings, topic, "billing")
    if settings.url:  # the running replay holds the replay subscription: an exclusive consumer
        import pulsar

        client = pulsar.Client(url, authentication=pulsar.AuthenticationToken(settings.jwt() or ""))
        holder = client.subscribe(dead_letters, "eventbus-replay", consumer_type=pulsar.ConsumerType.Exclusive)
        release = client.close
    else:  # the running replay holds the embedded broker's lease on the replay subscription
        lease = SubscriptionLease(settings.data_dir, dead_letters, "eventbus-replay")
        assert lease.acquire()
        holder, release = lease, lease.release
    try:
        result = cli(subprocess_env, "dlq", "replay", topic, "billing")
    finally:
        release()
    assert holder is not None
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # Last: the embedded broker's start-up line, or the C++ client's own ERROR line, may come before it.
    assert result.stderr.strip().splitlines()[-1] == f"error: another replay of {dead_letters} is running: wait for it to finish"
    assert len(await replay.show(settings, topic, "billing")) == 1


async def test_a_replay_whose_consumer_the_embedded_broker_still_holds_says_how_to_clear_it(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    """pulsar-lite tells a subscription's consumers apart by id alone: a consumer with the replay's id already on
    `eventbus-replay` (a killed replay's, which pulsar-lite sometimes keeps) makes it drop the replay's connection
    until the operation timeout. Before, the replay said only "Timeout"."""
    if settings.url:
        pytest.skip("pulsar-lite's: Apache Pulsar tells consumers apart by connection too")
    import pulsar

    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0})
        await app.wait_dead_lettered()
        url = app.bus.url
        dead_letters, _ = replay.topics(settings, topic, "billing")
        client = raw_client(url, None)
        try:
            # The replay's consumers are numbered as a killed replay's were: 0 reads the topic, 1 is the replay's.
            client.subscribe(f"{dead_letters}-other", "x")
            client.subscribe(dead_letters, "eventbus-replay", consumer_type=pulsar.ConsumerType.Shared)
            result = cli({**subprocess_env, "EVENTBUS_OPERATION_TIMEOUT_SECONDS": "3"}, "dlq", "replay", topic, "billing")
        finally:
            client.close()
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot subscribe 'eventbus-replay' to {dead_letters}: Timeout: "), last
    assert "may still hold the consumer of a replay that was killed" in last and "EVENTBUS_DATA_DIR" in last, last


async def test_a_retry_topic_that_cannot_be_created_is_logged_and_left(
    pulsar: dict, settings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not settings.url:
        pytest.skip("topic auto-creation is an Apache Pulsar namespace policy")
    namespace = f"noauto-{topic}"
    admin(pulsar, "PUT", f"/admin/v2/namespaces/public/{namespace}")
    admin(pulsar, "POST", f"/admin/v2/namespaces/public/{namespace}/autoTopicCreation", {"allowAutoTopicCreation": False})
    # Where authorization is on (the cluster), the client role is let in as on the test namespaces.
    admin(pulsar, "POST", f"/admin/v2/namespaces/public/{namespace}/permissions/client", ["produce", "consume"])
    admin(pulsar, "PUT", f"/admin/v2/persistent/public/{namespace}/{topic}")
    settings = settings.model_copy(update={"namespace": namespace})
    router = Router()

    @router.subscribe(topic, "billing")
    async def billing(order: dict) -> None: ...

    async with Harness(settings, [router]) as app:
        await app.publish(topic, {"n": 0})
        await app.wait_handled()
        states = {r.topic: r.state for r in app.bus.running}
    assert states == {settings.topic(topic): "consuming", replay.topics(settings, topic, "billing")[1]: "stopped"}
    assert "where `eventbus dlq replay` sends this group's dead letters back" in caplog.text
    assert "create the topic to replay into it" in caplog.text


async def test_a_forged_replay_marker_neither_hides_nor_discards_a_dead_letter(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    """The attacker may produce on the namespace: markers naming each dead letter, but not its copy."""
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0}, key="k0")
        await app.publish(topic, {"n": 1}, key="k1")
        dead = await app.wait_dead_lettered(2)
        url = app.bus.url
    dead_letters, retries = replay.topics(settings, topic, "billing")
    client = raw_client(url, settings.jwt())
    try:
        forger = client.create_producer(retries, producer_name="eventbus-replay-billing")
        for d, (key, payload) in zip(dead, [("k0", b'{"n":666}'), ("other", b'{"n":1}')]):  # another payload; another key
            forger.send(payload, partition_key=key, properties={REPLAYED_FROM: f"{dead_letters}@{id_text(d.message_id)}"})
    finally:
        client.close()

    shown = cli(subprocess_env, "dlq", "show", topic, "billing", "--json")
    assert [d["message_id"] for d in json.loads(shown.stdout)] == [id_text(d.message_id) for d in dead], shown.stderr
    assert f"2 message(s) on {retries} name a dead letter in {REPLAYED_FROM} but are not its copy" in shown.stderr
    result = cli(subprocess_env, "dlq", "replay", topic, "billing")
    assert result.returncode == 0 and result.stdout.count("replayed ") == 2, result.stdout + result.stderr
    assert "2 message(s) on" in result.stderr and "found on the retry topic already" not in result.stderr
    stored = read_stored(url, settings.jwt(), retries)
    assert sorted(p for p, ids in stored.items() for _ in ids) == [b'{"n":0}', b'{"n":1}', b'{"n":1}', b'{"n":666}']
    assert await replay.show(settings, topic, "billing") == []


async def test_a_replayed_request_goes_without_its_reply_address_and_says_so(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    """Its requester heard of the failure when it was dead-lettered: a reply now would only bring a gone reply topic back."""
    from eventbus import Reject, RequestFailed

    fixed = {"pricing": False}
    router = Router()

    @router.subscribe(topic, "billing", max_retries=0)
    async def price(sku: str) -> str:
        if not fixed["pricing"]:
            raise Reject("no price list yet")
        return f"price of {sku}"

    async with Harness(settings, [router]) as app:
        async with EventBus(settings, routers=[]) as requester:
            with pytest.raises(RequestFailed):
                await requester.request(topic, "tea", timeout=20)
        [dead] = await app.wait_dead_lettered()
        fixed["pricing"] = True
        replayed = cli(subprocess_env, "dlq", "replay", topic, "billing")
        assert "(a request: sent without its reply address; its requester was told it failed)" in replayed.stdout, (
            replayed.stdout + replayed.stderr
        )
        await app.wait_handled(1, group="billing", topic=f"{topic}-billing-RETRY")
        url = app.bus.url
    client = raw_client(url, settings.jwt())
    try:
        [copy] = read_messages(client, settings.topic(topic) + "-billing-RETRY")
        assert "eventbus-reply-to" not in copy.properties() and "eventbus-correlation-id" not in copy.properties()
        assert copy.properties()[REPLAYED_FROM].endswith("@" + id_text(dead.message_id)) and copy.data() == b'"tea"'
    finally:
        client.close()


async def test_a_dead_letter_and_its_replayed_copy_keep_the_original_event_time(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    """The docs promised it; every dead letter and replayed copy had event time 0 (a Java service reading them saw so)."""
    from datetime import datetime, timezone

    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    millis = int(when.timestamp() * 1000)
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 1}, key="k", event_time=when)
        await app.wait_dead_lettered()
        url = app.bus.url
    replayed = cli(subprocess_env, "dlq", "replay", topic, "billing")
    assert replayed.returncode == 0, replayed.stderr
    dead_letters, retries = replay.topics(settings, topic, "billing")
    client = raw_client(url, settings.jwt())
    try:
        [dead] = read_messages(client, dead_letters)
        [copy] = read_messages(client, retries)
    finally:
        client.close()
    assert (dead.event_timestamp(), copy.event_timestamp()) == (millis, millis)


async def test_a_javas_dead_letter_beside_ours_is_shown_attributed_and_never_replayed_into_our_group(
    settings: Settings, subprocess_env: dict[str, str], topic: str
) -> None:
    """Java's DeadLetterPolicy names the same `<topic>-<group>-DLQ` and writes REAL_TOPIC and ORIGIN_MESSAGE_ID.

    Before: `dlq show` listed Java's letter as `? ?: attempts=0 from ?` and `dlq replay` sent it to our retry topic.
    """
    async with Harness(settings, [failing(topic)]) as app:
        await app.publish(topic, {"n": 0}, key="k0")
        [ours] = await app.wait_dead_lettered(1)
        url = app.bus.url
    dead_letters, retries = replay.topics(settings, topic, "billing")
    client = raw_client(url, settings.jwt())
    try:
        java = client.create_producer(dead_letters)
        java.send(b'{"n":7}', partition_key="k7", properties={"REAL_TOPIC": settings.topic(topic), "ORIGIN_MESSAGE_ID": "9:9:-1"})
        [stored_ours] = [m for m in read_messages(client, dead_letters) if m.data() == b'{"n":0}']
    finally:
        client.close()
    # Ours speak Java's names too, so its tools read them.
    assert stored_ours.properties()["REAL_TOPIC"] == settings.topic(topic)
    assert stored_ours.properties()["ORIGIN_MESSAGE_ID"] == stored_ours.properties()["eventbus-original-message-id"]

    shown = json.loads(cli(subprocess_env, "dlq", "show", topic, "billing", "--json").stdout)
    java_letter = next(d for d in shown if d["foreign"])
    assert (java_letter["reason"], java_letter["original_topic"], java_letter["original_message_id"]) == (
        "not-eventbus", settings.topic(topic), "9:9:-1",
    )
    assert [d["message_id"] for d in shown if not d["foreign"]] == [id_text(ours.message_id)]
    result = cli(subprocess_env, "dlq", "replay", topic, "billing")
    assert result.returncode == 0 and result.stdout.count("replayed ") == 1, result.stdout + result.stderr
    assert "left 1 dead letter(s) not written by eventbus" in result.stderr
    assert [p for p, ids in read_stored(url, settings.jwt(), retries).items() for _ in ids] == [b'{"n":0}']
    [left] = await replay.show(settings, topic, "billing")
    assert left.foreign and left.data == b'{"n":7}'


async def test_a_dead_letter_topic_only_java_wrote_is_read_never_subscribed_and_never_replayed(
    settings: Settings, subprocess_env: dict[str, str], topic: str, request: pytest.FixtureRequest
) -> None:
    """Before: `dlq show` on Java's own `<topic>-<group>-DLQ` created the durable `eventbus-replay` subscription,
    which acknowledges nothing of another client's and so would keep its letters for good."""
    dead_letters, _ = replay.topics(settings, topic, "billing")
    async with EventBus(settings, routers=[]) as bus:
        url = bus.url
    client = raw_client(url, settings.jwt())
    try:
        java = client.create_producer(dead_letters)
        for n in (1, 2):
            java.send(f'{{"n":{n}}}'.encode(), properties={"REAL_TOPIC": settings.topic(topic), "ORIGIN_MESSAGE_ID": f"9:{n}:-1"})
    finally:
        client.close()
    shown = json.loads(cli(subprocess_env, "dlq", "show", topic, "billing", "--json").stdout)
    assert [(d["foreign"], d["original_message_id"]) for d in shown] == [(True, "9:1:-1"), (True, "9:2:-1")]
    result = cli(subprocess_env, "dlq", "replay", topic, "billing")
    assert result.returncode == 0 and "replayed " not in result.stdout, result.stdout + result.stderr
    assert "left 2 dead letter(s) not written by eventbus" in result.stderr
    if settings.url:
        path = "/admin/v2/" + dead_letters.replace("://", "/") + "/stats"
        stats: Any = admin(request.getfixturevalue("pulsar"), "GET", path)
        assert REPLAY_SUBSCRIPTION not in stats["subscriptions"], stats["subscriptions"]
    assert [d.data for d in await replay.show(settings, topic, "billing")] == [b'{"n":1}', b'{"n":2}']
