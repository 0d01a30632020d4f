"""compose.yaml, .env.example and Settings describe the same configuration."""

from __future__ import annotations

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
    # Defaults in .env.example match the code's defaults, except the URL it points at compose's Pulsar.
    defaults = Settings(_env_file=None, **{"url": settings.url})
    assert settings.model_dump() == defaults.model_dump()
    assert settings.url == "pulsar://localhost:6650"


def test_compose_runs_pulsar_3_0_with_health_check_and_volume() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    pulsar = compose["services"]["pulsar"]
    assert pulsar["image"].startswith("apachepulsar/pulsar:3.0.")
    assert "/admin/v2/clusters" in " ".join(pulsar["healthcheck"]["test"])
    assert any(v.endswith(":/pulsar/data") for v in pulsar["volumes"])
    assert "6650:6650" in pulsar["ports"]


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
    assert float(worker["stop_grace_period"].rstrip("s")) > float(env["EVENTBUS_SHUTDOWN_DRAIN_TIMEOUT"])
