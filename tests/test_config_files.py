"""compose.yaml, .env.example and Settings describe the same configuration."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import yaml

from eventbus import Settings

ROOT = Path(__file__).resolve().parent.parent


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value
    return out


def setting_env_names() -> set[str]:
    return {f"EVENTBUS_{name.upper()}" for name in Settings.model_fields}


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    assert set(env_example()) == setting_env_names()


def test_env_example_values_are_valid_settings(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    values = {k: v for k, v in env_example().items() if v != ""}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    # Defaults in .env.example match the code's defaults: copied as is, it keeps the embedded broker.
    assert settings.model_dump() == Settings(_env_file=None).model_dump()
    assert settings.uses_embedded


def script(name: str):  # type: ignore[no-untyped-def]
    """One of scripts/ loaded as a module (they have no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(ROOT / "scripts" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def standalone_script():  # type: ignore[no-untyped-def]
    return script("pulsar-standalone")


def test_compose_runs_the_pulsar_the_tests_run_with_health_check_and_volume() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    pulsar = compose["services"]["pulsar"]
    image, _, tag = pulsar["image"].partition(":")
    assert image == "apachepulsar/pulsar" and tag in standalone_script().pulsarkit.PULSAR_VERSIONS, "the 4.0 LTS the tests run"
    assert "--no-functions-worker" in pulsar["command"] and "--no-stream-storage" in pulsar["command"]
    assert "/admin/v2/clusters" in " ".join(pulsar["healthcheck"]["test"])
    assert any(v.endswith(":/pulsar/data") for v in pulsar["volumes"])
    assert "127.0.0.1:6650:6650" in pulsar["ports"]


def test_compose_counts_permits_by_message_like_the_test_broker(tmp_path) -> None:
    # The memory bound (test_memory.py) holds only when the broker does.
    script = standalone_script()
    script.RUN_DIR = tmp_path
    conf = script.write_conf({"broker_port": 1, "web_port": 2, "tls_port": 3, "admin_token": "x"}).read_text()
    assert "preciseDispatcherFlowControl=true" in conf.splitlines()
    assert "acknowledgmentAtBatchIndexLevelEnabled=true" in conf.splitlines()
    pulsar = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["pulsar"]
    assert pulsar["environment"]["preciseDispatcherFlowControl"] == "true"
    assert pulsar["environment"]["acknowledgmentAtBatchIndexLevelEnabled"] == "true"


def _stop_takes(env: dict) -> float:
    """The longest a graceful stop may take with these settings: the drain, then the lifespans' exits."""
    return float(env["EVENTBUS_SHUTDOWN_DRAIN_TIMEOUT"]) + float(env["EVENTBUS_SHUTDOWN_EXIT_TIMEOUT"])


def test_compose_worker_uses_known_settings_pointing_at_the_pulsar_service() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    worker = compose["services"]["worker"]
    env = worker["environment"]
    assert set(env) <= setting_env_names()
    Settings(_env_file=None, **{k.removeprefix("EVENTBUS_").lower(): v for k, v in env.items()})
    assert env["EVENTBUS_URL"] == "pulsar://pulsar:6650"
    assert "python -m eventbus run" in worker["command"]
    assert worker["depends_on"]["pulsar"]["condition"] == "service_healthy"
    # The worker gets longer than its drain timeout to stop before compose kills it.
    assert float(worker["stop_grace_period"].rstrip("s")) > _stop_takes(env)
    port = env["EVENTBUS_METRICS_PORT"]
    assert f"127.0.0.1:{port}:{port}" in worker["ports"] and f":{port}/readyz" in " ".join(worker["healthcheck"]["test"])
    assert env["EVENTBUS_METRICS_HOST"] == "0.0.0.0", "loopback inside a container answers nobody outside it"


def test_the_kubernetes_deployment_probes_scrapes_and_outlasts_the_drain() -> None:
    deployment = yaml.safe_load((ROOT / "deploy" / "worker.yaml").read_text())
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= setting_env_names()
    Settings(_env_file=None, **{k.removeprefix("EVENTBUS_").lower(): v for k, v in env.items() if v is not None})
    assert pod["spec"]["terminationGracePeriodSeconds"] > _stop_takes(env)
    port = int(env["EVENTBUS_METRICS_PORT"])
    (named,) = [p for p in container["ports"] if p["containerPort"] == port]
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": named["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": named["name"]}
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(port), "/metrics")
    assert env["EVENTBUS_METRICS_HOST"] == "0.0.0.0" and env["EVENTBUS_EMBEDDED"] == "false"

def test_compose_auth_opt_in_sets_what_the_test_broker_sets(tmp_path) -> None:
    script = standalone_script()
    st = {"broker_port": 1, "web_port": 2, "tls_port": 3, "admin_token": "x"}
    script.RUN_DIR = tmp_path
    conf = dict(line.split("=", 1) for line in script.write_conf(st).read_text().splitlines() if line)
    tested = {k for k in conf if "uth" in k or k in ("tokenSecretKey", "superUserRoles")}
    auth = yaml.safe_load((ROOT / "compose.auth.yaml").read_text())["services"]
    # Authorization too, as the cluster runs it: the test standalone's tests create namespaces as they go.
    assert set(auth["pulsar"]["environment"]) == tested | {"authorizationEnabled"}
    assert _auth(auth["pulsar"]["environment"]) == _auth(_cluster_broker_conf())
    assert "Authorization: Bearer" in " ".join(auth["pulsar"]["healthcheck"]["test"])
    assert set(auth["worker"]["environment"]) <= setting_env_names()
    worker = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["worker"]["environment"]
    _grants_the_client_only_its_namespace(auth, worker)


def _cluster_broker_conf() -> dict[str, str]:
    ports = {"zk": {"client": 1}, "broker-1": {"service": 2, "web": 3, "tls": 4}}
    return dict(line.split("=", 1) for line in script("pulsar-cluster").broker_conf({"ports": ports, "admin_token": "x"}, "broker-1"))


def _auth(env: dict[str, str]) -> dict[str, str]:
    """The authentication and authorization settings of a broker, but for where the key and tokens live."""
    return {k: v for k, v in env.items() if ("uth" in k or k == "superUserRoles") and "Parameters" not in k}


def _grants_the_client_only_its_namespace(services: dict, worker_env: dict[str, str]) -> None:
    """A one-shot service grants the worker's role produce and consume on the worker's namespace; the worker waits for it."""
    grant = services["grant-client"]
    namespace = f"{worker_env.get('EVENTBUS_TENANT', 'public')}/{worker_env.get('EVENTBUS_NAMESPACE', 'default')}"
    words = grant["command"].split()
    at = words.index("grant-permission")
    assert words[at + 1 :] == [namespace, "--role", "client", "--actions", 'produce,consume"'], words
    assert grant["restart"] == "no"
    assert services["worker"]["depends_on"]["grant-client"] == {"condition": "service_completed_successfully"}
    assert services["worker"]["environment"]["EVENTBUS_TOKEN_FILE"] == "/app/secrets/client.jwt"


def test_compose_publishes_ports_on_the_hosts_loopback_only() -> None:
    """Plain compose.yaml has no authentication: whoever reached 6650 or 8080 was an admin."""
    published = []
    for name in ("compose.yaml", "compose.auth.yaml", "compose.cluster.yaml"):
        for service in yaml.safe_load((ROOT / name).read_text())["services"].values():
            published += service.get("ports", [])
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published


def test_compose_cluster_is_the_shape_the_cluster_tests_run() -> None:
    """compose.cluster.yaml: three brokers set as scripts/pulsar-cluster sets its, a worker naming every broker."""
    services = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())["services"]
    brokers = {n: s for n, s in services.items() if n.startswith("broker-")}
    bookies = {n: s for n, s in services.items() if n.startswith("bookie-")}
    assert len(brokers) == 3 and len(bookies) == 3 and len([n for n in services if n.startswith("zk-")]) == 3
    cluster = script("pulsar-cluster")
    tested = dict(line.split("=", 1) for line in cluster.broker_conf(
        {"ports": {"zk": {"client": 1}, "broker-1": {"service": 2, "web": 3, "tls": 4}}, "admin_token": "x"}, "broker-1"
    ))
    same = ("clusterName", "managedLedgerDefaultEnsembleSize", "managedLedgerDefaultWriteQuorum",
            "managedLedgerDefaultAckQuorum", "preciseDispatcherFlowControl", "acknowledgmentAtBatchIndexLevelEnabled",
            "brokerShutdownTimeoutMs")
    for name, service in brokers.items():
        env = service["environment"]
        assert {k: env[k] for k in same} == {k: tested[k] for k in same}, name
        assert env["advertisedAddress"] == name and "bin/pulsar broker" in service["command"]
        assert env["metadataStoreUrl"] == env["configurationMetadataStoreUrl"] == "zk:zk-1:2181,zk-2:2181,zk-3:2181"
        assert int(env["metadataStoreSessionTimeoutMillis"]) <= 30_000
        assert _auth(env) == _auth(tested), name
    # One bookie may die: the ensemble leaves one to take its place.
    assert int(tested["managedLedgerDefaultEnsembleSize"]) < len(bookies)
    assert int(tested["managedLedgerDefaultAckQuorum"]) <= int(tested["managedLedgerDefaultWriteQuorum"])
    worker = services["worker"]
    env = worker["environment"]
    assert set(env) <= setting_env_names()
    settings = Settings(_env_file=None, **{k.removeprefix("EVENTBUS_").lower(): v for k, v in env.items()})
    assert settings.url == "pulsar://" + ",".join(f"{n}:6650" for n in sorted(brokers))
    assert env["EVENTBUS_ADMIN_URL"].split(",") == [f"http://{n}:8080" for n in sorted(brokers)]
    assert set(worker["depends_on"]) == set(brokers) | {"grant-client"}
    _grants_the_client_only_its_namespace(services, env)
    # The publish deadline outlasts a failover: the metadata session plus a lookup.
    session = max(int(s["environment"]["metadataStoreSessionTimeoutMillis"]) for s in brokers.values())
    assert settings.producer_send_timeout_ms > 2 * session
    assert float(worker["stop_grace_period"].rstrip("s")) > _stop_takes(env)
    assert services["worker"]["image"] == yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["worker"]["image"]
    image = {s["image"] for s in services.values() if s is not worker}
    assert image == {yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["pulsar"]["image"]}
