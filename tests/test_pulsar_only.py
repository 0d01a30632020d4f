"""What only real Apache Pulsar can show: auth, delayed delivery, deduplication, partitions, tenants."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
import uuid

import anyio
import pytest

from eventbus import AuthenticationFailed, ConfigError, EventBus, Message, Router, Settings

from .conftest import ROOT, eventually, raw_client, running
from .pulsar_admin import admin
from .test_worker_process import cli

pytestmark = pytest.mark.pulsar


@pytest.fixture
def psettings(pulsar: dict) -> Settings:
    return Settings(_env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], shutdown_drain_timeout=10)


async def test_a_valid_token_publishes_and_consumes(psettings: Settings, topic: str) -> None:
    got: list[dict] = []
    router = Router()
    router.subscribe(topic, "g", initial_position="earliest")(lambda body, msg=None: got.append(body))
    async with EventBus(psettings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, {"hello": "pulsar"})
        await eventually(lambda: got)
    assert got == [{"hello": "pulsar"}]


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_missing_or_wrong_token_fails_at_once_naming_authentication(
    pulsar: dict, base_env: dict[str, str], token: str | None
) -> None:
    env = {**base_env, "EVENTBUS_URL": pulsar["service_url"]}
    if token == "wrong":
        # Signed with another key: well-formed, and still refused.
        token = pulsar["client_token"][:-6] + "AAAAAA"
        env["EVENTBUS_TOKEN"] = token
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "publish", "auth-check", "1"], env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "authentication" in err.lower() and "EVENTBUS_TOKEN" in err
    assert elapsed < 10, f"took {elapsed:.1f}s: it must not wait for the client's 30 s operation timeout"
    if token:
        assert token not in err and token.rsplit(".", 1)[-1] not in err


async def test_wrong_token_in_process_raises_without_the_token(pulsar: dict) -> None:
    token = pulsar["client_token"][:-6] + "BBBBBB"
    settings = Settings(_env_file=None, url=pulsar["service_url"], token=token)
    with pytest.raises(AuthenticationFailed, match="rejected authentication") as caught:
        async with EventBus(settings, routers=[]):
            pass
    assert token not in str(caught.value) and token not in repr(caught.value)


async def test_delayed_delivery_arrives_no_earlier_than_asked(psettings: Settings, topic: str) -> None:
    arrivals: dict[str, float] = {}
    router = Router()

    @router.subscribe(topic, "g", subscription_type="shared", initial_position="earliest")
    async def h(body: dict) -> None:
        arrivals[body["name"]] = time.time()

    async with EventBus(psettings, routers=[router]) as bus, running(bus):
        sent = time.time()
        await bus.publish(topic, {"name": "delayed"}, deliver_after=2.0)
        await bus.publish(topic, {"name": "now"})
        await eventually(lambda: "delayed" in arrivals, timeout=30)
    assert arrivals["now"] < arrivals["delayed"], "the undelayed message, sent later, comes first"
    # Pulsar delivers no earlier than asked; its tick (1 s by default) may only make it later.
    assert arrivals["delayed"] - sent >= 2.0 - 0.05


async def test_deduplication_stores_a_resent_sequence_id_once(pulsar: dict, topic: str) -> None:
    settings = Settings(
        _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], namespace="dedup",
        producer_name=f"dedup-{uuid.uuid4().hex[:8]}",
    )
    got: list[int] = []
    router = Router()
    router.subscribe(topic, "g", initial_position="earliest")(got.append)
    async with EventBus(settings, routers=[]) as first:
        await first.publish(topic, 1, sequence_id=1)
        await first.publish(topic, 2, sequence_id=2)
    # A new producer with the same name resends 2 (as after a crash before its receipt), then 3.
    async with EventBus(settings, routers=[router]) as second, running(second):
        await second.publish(topic, 2, sequence_id=2)
        await second.publish(topic, 3, sequence_id=3)
        await eventually(lambda: 3 in got)
    assert got == [1, 2, 3]


@pytest.mark.parametrize("kind", ["key_shared", "failover"])
async def test_partitioned_topic_keeps_key_order_and_handles_each_message_once(
    pulsar: dict, psettings: Settings, topic: str, kind: str
) -> None:
    admin(pulsar, "PUT", f"/admin/v2/persistent/public/default/{topic}/partitions", 4)
    handled: list[tuple[str, int, int]] = []

    def router_for(worker: int) -> Router:
        router = Router()

        @router.subscribe(topic, "g", subscription_type=kind, concurrency=4, initial_position="earliest")
        async def h(body: dict, msg: Message) -> None:
            await anyio.sleep(0.001 * (body["seq"] % 3))
            handled.append((body["key"], body["seq"], worker))

        return router

    # 32 keys: each lands on either consumer by its hash, so with 8 all of them went to one about
    # once in a hundred runs (seen once on 4.0.7), and "both took part" failed by chance.
    keys = [f"key-{i}" for i in range(32)]
    per_key = 10
    async with EventBus(psettings, routers=[router_for(1)]) as w1, running(w1):
        async with EventBus(psettings, routers=[router_for(2)]) as w2, running(w2):
            for seq in range(per_key):
                for k in keys:
                    await w1.publish(topic, {"key": k, "seq": seq}, key=k)
            await eventually(lambda: len(handled) >= len(keys) * per_key, timeout=60)
    per: dict[str, list[int]] = collections.defaultdict(list)
    for key, seq, _ in handled:
        per[key].append(seq)
    for key in keys:
        assert per[key] == list(range(per_key)), f"{key}: {per[key]}"
    assert len(handled) == len(keys) * per_key, "each message handled once in the group"
    if kind == "key_shared":
        assert {w for *_, w in handled} == {1, 2}, "both consumers took part"
    else:
        assert len({w for *_, w in handled}) == 1, "failover: one member consumes, the other stands by"


async def test_tenant_and_namespace_settings_route_short_topic_names(pulsar: dict) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:6]}"
    admin(pulsar, "PUT", f"/admin/v2/tenants/{tenant}", {"adminRoles": ["admin"], "allowedClusters": ["standalone"]})
    admin(pulsar, "PUT", f"/admin/v2/namespaces/{tenant}/orders")
    settings = Settings(
        _env_file=None, url=pulsar["service_url"], token=pulsar["client_token"], tenant=tenant, namespace="orders"
    )
    seen: list[Message] = []
    router = Router()

    @router.subscribe("invoices", "billing", initial_position="earliest")
    async def h(body: dict, msg: Message) -> None:
        seen.append(msg)

    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish("invoices", {"n": 1})
        await eventually(lambda: seen)
    assert seen[0].topic == f"persistent://{tenant}/orders/invoices"
    assert f"persistent://{tenant}/orders/invoices" in admin(pulsar, "GET", f"/admin/v2/persistent/{tenant}/orders")


async def test_tls_with_the_ca_and_hostname_verification(pulsar: dict, topic: str) -> None:
    settings = Settings(
        _env_file=None, url=pulsar["tls_service_url"], token=pulsar["client_token"],
        tls_trust_certs_file=pulsar["ca_file"], tls_validate_hostname=True,
    )
    got: list[int] = []
    router = Router()
    router.subscribe(topic, "g", initial_position="earliest")(got.append)
    async with EventBus(settings, routers=[router]) as bus, running(bus):
        await bus.publish(topic, 42)
        await eventually(lambda: got)
    assert got == [42]


async def test_tls_with_the_wrong_ca_fails_clearly(pulsar: dict) -> None:
    from eventbus import ConfigError

    settings = Settings(
        _env_file=None, url=pulsar["tls_service_url"], token=pulsar["client_token"],
        tls_trust_certs_file=pulsar["other_ca_file"],
    )
    with pytest.raises(ConfigError, match=r"TLS with the broker .* failed \(CERTIFICATE_VERIFY_FAILED\).*EVENTBUS_TLS_TRUST_CERTS_FILE"):
        async with EventBus(settings, routers=[]):
            pass


async def test_a_namespace_that_does_not_exist_is_named_at_once(psettings: Settings, topic: str) -> None:
    missing = psettings.model_copy(update={"namespace": f"absent-{uuid.uuid4().hex[:6]}"})
    router = Router()
    router.subscribe(topic, "g")(lambda body: None)
    async with EventBus(missing, routers=[router]) as bus:
        with anyio.fail_after(20), pytest.raises(ConfigError, match=rf"namespace public/{missing.namespace} exist\?"):
            await bus.publish(topic, 1)
        with anyio.fail_after(20), pytest.raises(ConfigError, match="TopicNotFound") as caught:
            await bus.run(handle_signals=False)  # not retried for ever: the worker stops with the reason
    # The client's own error is kept as the cause (map_client_errors), so a traceback shows both.
    cause = caught.value.__cause__
    assert cause is not None and type(cause).__module__.split(".")[0] in ("pulsar", "_pulsar"), repr(cause)


def test_a_publish_and_a_resend_the_broker_never_answers_end_at_the_deadline_naming_it(
    pulsar: dict, base_env: dict[str, str], topic: str
) -> None:
    # A message above a topic's maxMessageSize policy: Apache Pulsar drops the connection, and the client
    # sends it again on each reconnect, for good. Random bytes: LZ4 would shrink anything else below the limit.
    import secrets

    from eventbus.operating import replay

    settings = Settings(_env_file=None, url=pulsar["service_url"], token=pulsar["client_token"])
    dead_letters, retries = replay.topics(settings, topic, "billing")
    for name in (topic, retries):
        admin(pulsar, "PUT", f"/admin/v2/persistent/public/default/{name.rsplit('/', 1)[-1]}")
        admin(pulsar, "POST", f"/admin/v2/persistent/public/default/{name.rsplit('/', 1)[-1]}/maxMessageSize", 1024)
    big = '{"blob": "%s"}' % secrets.token_hex(2000)

    async def dead_letter() -> None:
        import pulsar as client_lib

        async with EventBus(settings, routers=[]) as bus:
            client = client_lib.Client(bus.url, authentication=client_lib.AuthenticationToken(settings.jwt() or ""))
            client.subscribe(dead_letters, "eventbus-replay", initial_position=client_lib.InitialPosition.Earliest).close()
            client.close()
            # As the bus writes one (a letter without eventbus-dlq-reason is another client's: left by a replay).
            await bus.publish(
                dead_letters, big.encode(), properties={"eventbus-dlq-reason": "handler-failed", "eventbus-error-type": "ValueError"}
            )

    anyio.run(dead_letter)
    env = {**base_env, "EVENTBUS_URL": pulsar["service_url"], "EVENTBUS_TOKEN": pulsar["client_token"],
           "EVENTBUS_ADMIN_URL": pulsar["admin_url"], "EVENTBUS_ADMIN_TOKEN": pulsar["admin_token"],
           "EVENTBUS_SEND_DEADLINE_SECONDS": "3"}
    started = time.monotonic()
    published = subprocess.run([sys.executable, "-m", "eventbus", "publish", topic, big], env=env,
                               capture_output=True, text=True, timeout=60)
    replayed = subprocess.run([sys.executable, "-m", "eventbus", "dlq", "replay", topic, "billing"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 40, "each gave up at its deadline (3 s) and closed within 5 s more"
    assert published.returncode == 1 and published.stderr.strip().splitlines() == [
        f"error: the broker did not confirm the publish to {settings.topic(topic)} within 3 s "
        "(EVENTBUS_SEND_DEADLINE_SECONDS): is the message larger than the topic's maxMessageSize? "
        "It may or may not be stored"
    ], published.stderr
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "did not confirm the resend of" in replayed.stderr and "within 3 s" in replayed.stderr
    assert "0 failed" not in replayed.stderr and "1 failed" in replayed.stderr
    assert [d.data for d in anyio.run(replay.show, settings, topic, "billing")] == [big.encode()], "left in place"


async def test_a_group_held_with_another_subscription_type_is_one_error_not_ready_until_it_can_join(
    pulsar: dict, psettings: Settings, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Java service's Exclusive consumer held the group: the bus stood by 'for another member' at INFO, ready."""
    import urllib.error
    import urllib.request

    import pulsar as client_lib

    def readyz(port: int) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    full = psettings.topic(topic)
    client = raw_client(pulsar["service_url"], pulsar["client_token"])
    holder = client.subscribe(full, "g", consumer_type=client_lib.ConsumerType.Exclusive)
    router = Router()
    handled: list[int] = []

    @router.subscribe(topic, "g")  # key_shared
    async def h(n: int) -> None:
        handled.append(n)

    observed = psettings.model_copy(update={"metrics_port": 0})
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EB_TOPIC": topic, "EVENTBUS_URL": psettings.url,
           "EVENTBUS_TOKEN": pulsar["client_token"], "EVENTBUS_ADMIN_URL": pulsar["admin_url"],
           "EVENTBUS_ADMIN_TOKEN": pulsar["admin_token"]}
    shown = cli(env, "status", "tests.apps.failing")  # its handler: group g, key_shared
    assert "Exclusive (app: key_shared: it cannot join)" in shown.stdout, shown.stdout + shown.stderr
    try:
        async with EventBus(observed, routers=[router]) as bus, running(bus):
            [runner] = [r for r in bus.running if r.topic == full]
            await eventually(lambda: runner.state == "conflict", what="the conflict seen")
            assert bus.probe_port and await anyio.to_thread.run_sync(readyz, bus.probe_port) == 503
            holder.close()
            await eventually(lambda: runner.state == "consuming", timeout=60, what="joined once the holder left")
            assert await anyio.to_thread.run_sync(readyz, bus.probe_port) == 200
            await bus.publish(topic, 1)
            await eventually(lambda: handled == [1], what="handled")
    finally:
        client.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "cannot join group g" in r.getMessage()]
    assert len(errors) == 1 and "key_shared consumer (ConsumerBusy)" in errors[0], errors
    assert not [r for r in caplog.records if "standby: another member" in r.getMessage()]


async def test_an_idle_subscriptions_acknowledgements_reach_the_broker_while_nothing_else_arrives(
    pulsar: dict, psettings: Settings, topic: str
) -> None:
    """The intake sends acknowledgements when it looks at the client's queue; waiting on an empty one (the client's
    callback), the handlers' finishes send them (else each waited for the next message: redelivered by a crash)."""
    handled: list[int] = []
    router = Router()

    @router.subscribe(topic, "g", initial_position="earliest")
    async def record(n: int) -> None:
        await anyio.sleep(0.05)  # some I/O: the intake is back waiting on the empty queue when the handler ends
        handled.append(n)

    path = "/admin/v2/" + psettings.topic(topic).replace("://", "/") + "/stats"

    def settled() -> bool:
        stats = admin(pulsar, "GET", path)["subscriptions"]["g"]
        return bool(stats["msgBacklog"] == 0 and stats["unackedMessages"] == 0)

    async with EventBus(psettings, routers=[router]) as bus, running(bus):
        for n in range(3):
            await bus.publish(topic, n)
            await eventually(lambda: len(handled) == n + 1)
        await eventually(settled, timeout=10, what="the three acknowledgements stored while the worker still runs")
