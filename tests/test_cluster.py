"""On an Apache Pulsar cluster (scripts/pulsar-cluster): brokers die, stop and move topics, a bookie dies.

The lane: `python -m pytest --brokers cluster tests/test_cluster.py ...` (.ci/run runs it). Each fault
runs under tests/chaos.py's load (one publisher process, two worker processes, key_shared), which reads
back every confirmed publish and every handling and fails on a loss, a per-key order violation or a
duplicate it cannot attribute; here the publishers also run with the default publish deadline, so
a failover must surface no error to them.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from eventbus import EventBus, Router, Settings

from .conftest import ROOT, eventually, running

pytestmark = pytest.mark.slow


def row(output: str, name: str) -> str:
    found = re.search(rf"^\s+{re.escape(name)}\s+(\S.*)$", output, re.M)
    assert found, f"no row {name!r} in:\n{output}"
    return found.group(1).strip()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "faults",
    [["owner-kill", "owner-term"], ["rolling-restart"], ["topic-unload", "bundle-split", "bookie-kill"]],
    ids=lambda faults: "+".join(faults),
)
def test_a_broker_fault_under_load_loses_nothing_keeps_key_order_and_surfaces_no_error(
    cluster: dict, faults: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--broker", "cluster", "--seconds", "40", "--seed", "21",
         "--faults", *faults, "--schedule", "cycle", "--fault-interval", "3", "5", "--keys", "32", "--rate", "150",
         "--drain-timeout", "180"],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert row(result.stdout, "lost") == "0"
    assert row(result.stdout, "order violations") == "0"
    assert row(result.stdout, "publish errors (unconfirmed, raised)") == "0", "a failover surfaced to the app"
    assert row(result.stdout, "after none") == "0", "a duplicate no fault explains"
    for fault in faults:
        assert int(row(result.stdout, f"faults: {fault}")) >= 1, f"{fault} was not injected"


def test_the_client_role_may_publish_and_consume_but_not_administer(cluster: dict) -> None:
    """Authorization is on: the client token may not create namespaces, read the brokers' stats or grant itself."""
    client = {"Authorization": f"Bearer {cluster['client_token']}"}
    refused = [
        ("PUT", "/admin/v2/namespaces/public/not-yours", None),
        ("GET", "/admin/v2/broker-stats/topics", None),
        ("GET", "/admin/v2/brokers/eventbus", None),
        ("POST", "/admin/v2/namespaces/public/default/permissions/client", ["produce", "consume", "functions"]),
        ("DELETE", "/admin/v2/namespaces/public/dedup", None),
    ]
    for method, path, body in refused:
        answer = httpx.request(method, cluster["admin_url"] + path, headers=client, json=body, timeout=30)
        assert answer.status_code in (401, 403), f"{method} {path}: HTTP {answer.status_code}"
    admin = {"Authorization": f"Bearer {cluster['admin_token']}"}
    answer = httpx.get(cluster["admin_url"] + "/admin/v2/namespaces/public", headers=admin, timeout=30)
    assert answer.status_code == 200 and "public/not-yours" not in answer.json()


async def test_the_bus_needs_only_the_client_role_for_topics_retries_and_dead_letters(cluster: dict, topic: str) -> None:
    settings = Settings(_env_file=None, url=cluster["service_url"], token=cluster["client_token"],
                        shutdown_drain_timeout=10)
    router = Router()
    seen: list[int] = []

    @router.subscribe(topic, "billing", max_retries=1, retry_backoff=0.1)
    async def billing(payload: dict) -> None:
        seen.append(payload["n"])
        if payload["n"] == 0:
            raise ValueError("refused")

    dead: list[bytes] = []
    watcher = Router()

    @watcher.subscribe(settings.topic(topic) + "-billing-DLQ", "watch", initial_position="earliest")
    async def watch(data: bytes) -> None:
        dead.append(data)

    async with EventBus(settings, routers=[router, watcher]) as bus, running(bus):
        await bus.publish(topic, {"n": 0})
        await bus.publish(topic, {"n": 1})
        await eventually(lambda: dead and 1 in seen, timeout=60, what="a dead letter and a handled message")
    assert seen.count(0) == 2, "retried once, then dead-lettered"
