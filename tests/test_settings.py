from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eventbus import ConfigError, EventBus, Settings
from eventbus.settings import normalize_service_url


TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2VuLWJvZHk.super-secret-signature"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("EVENTBUS_") or name in ("MQ_NAME_SERVER", "PULSAR_JWT_TOKEN"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pulsar://b1:6650,pulsar://b2:6650,pulsar://b3:6650", "pulsar://b1:6650,b2:6650,b3:6650"),
        ("pulsar://b1:6650,b2:6651", "pulsar://b1:6650,b2:6651"),
        ("pulsar://localhost", "pulsar://localhost:6650"),
        ("pulsar+ssl://broker.example.com/", "pulsar+ssl://broker.example.com:6651"),
        (" pulsar://[::1]:6650 ", "pulsar://[::1]:6650"),
        ("", ""),
    ],
)
def test_url_normalisation(raw: str, expected: str) -> None:
    assert normalize_service_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("http://b1:6650", "scheme 'http'"),
        ("localhost:6650", "no scheme"),
        ("pulsar://b1:6650,pulsar+ssl://b2:6651", "mixes schemes"),
        ("pulsar://b1:99999", "invalid port"),
        ("pulsar://", "no host"),
        ("pulsar://b1:6650/admin", "path"),
    ],
)
def test_bad_urls_are_rejected_with_the_fix(raw: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        normalize_service_url(raw)


def test_seed_deployment_names_are_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQ_NAME_SERVER", "pulsar://pulsar-broker-1:6650,pulsar://pulsar-broker-2:6650")
    monkeypatch.setenv("PULSAR_JWT_TOKEN", TOKEN)
    settings = Settings()
    assert settings.url == "pulsar://pulsar-broker-1:6650,pulsar-broker-2:6650"
    assert settings.jwt() == TOKEN


def test_own_names_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("EVENTBUS_URL=pulsar://from-dotenv:6650\nEVENTBUS_NAMESPACE=orders\n")
    monkeypatch.setenv("EVENTBUS_TENANT", "acme")
    settings = Settings()
    assert (settings.url, settings.tenant, settings.namespace) == ("pulsar://from-dotenv:6650", "acme", "orders")
    assert settings.topic("invoices") == "persistent://acme/orders/invoices"
    assert settings.topic("non-persistent://x/y/z") == "non-persistent://x/y/z"


def test_a_misspelt_key_in_the_env_file_is_an_error_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base_env: dict[str, str]
) -> None:
    (tmp_path / ".env").write_text("EVENTBUS_BROKR_URL=pulsar://prod:6650\nOTHER_TOOL_KEY=1\nEVENTBUS_NAMESPACE=orders\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"in \.env: EVENTBUS_BROKR_URL is not a setting \(did you mean EVENTBUS_URL\?\)"):
        Settings()
    assert Settings(_env_file=None).namespace == "default"  # the file's own problem, not the process's

    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "publish", "t", "1"], cwd=tmp_path, env=base_env, capture_output=True, text=True
    )
    assert (result.returncode, result.stderr) == (
        2, "error: in .env: EVENTBUS_BROKR_URL is not a setting (did you mean EVENTBUS_URL?)\n"
    )
    (tmp_path / ".env").write_text("OTHER_TOOL_KEY=1\nEVENTBUS_NAMESPACE=orders\n")  # a shared .env: others' keys are theirs
    assert Settings().namespace == "orders"


def test_seed_defaults() -> None:
    s = Settings()
    assert s.uses_embedded
    assert (s.producer_batching_max_messages, s.producer_batching_max_bytes) == (1000, 1024 * 1024)
    assert (s.producer_compression, s.producer_send_timeout_ms, s.consumer_receiver_queue_size) == ("lz4", 120_000, 1000)


def test_token_never_in_repr_str_or_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSAR_JWT_TOKEN", TOKEN)
    settings = Settings()
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(EventBus(settings, routers=[]))):
        assert TOKEN not in text and "super-secret" not in text


def test_unreadable_token_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(token_file=tmp_path / "missing.jwt")
    with pytest.raises(ValueError, match=r"cannot read token file .*missing.jwt"):
        settings.jwt()


def test_bad_numbers_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_CONSUMER_RECEIVER_QUEUE_SIZE", "0")
    with pytest.raises(ConfigError, match="EVENTBUS_CONSUMER_RECEIVER_QUEUE_SIZE: Input should be greater than or equal to 1"):
        Settings()


def test_a_misspelt_setting_from_python_is_one_line_naming_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings(urll=...) was ignored without a word; a typo in the environment gave pydantic's boilerplate.
    with pytest.raises(ConfigError) as caught:
        Settings(_env_file=None, urll="pulsar://b:6650")
    assert str(caught.value) == "Settings(urll=...): not a setting (did you mean url?)"
    assert Settings(_env_file=None, MQ_NAME_SERVER="pulsar://b:6650").url == "pulsar://b:6650", "aliases still work"
    monkeypatch.setenv("EVENTBUS_URLL", "pulsar://b:6650")
    with pytest.raises(ConfigError) as env_caught:
        Settings(_env_file=None)
    assert str(env_caught.value) == (
        "invalid settings: EVENTBUS_URLL is not a setting (did you mean EVENTBUS_URL?) (see .env.example)"
    )


def test_token_stays_out_of_logs(settings: Settings, subprocess_env: dict[str, str], topic: str) -> None:
    # Real Pulsar checks the token; the embedded broker ignores it, but the client still sends it.
    # A process of its own: the C++ client's logger is chosen once per process, by its first client.
    token = settings.jwt() or TOKEN
    env = {**subprocess_env, "EVENTBUS_TOKEN": token, "EVENTBUS_LOG_LEVEL": "DEBUG"}
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "publish", topic, '{"n": 1}'], env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logs = result.stdout + result.stderr
    assert "eventbus.pulsar" in logs and "Connected to broker" in logs, "the client's debug logs are there"
    assert token not in logs
    assert token.rsplit(".", 1)[-1] not in logs, "not even the signature"


@pytest.mark.parametrize(
    "name, value",
    [
        ("EVENTBUS_URL", "pulsar://user:p4ssw0rd@broker:6650"),
        ("EVENTBUS_URL", "pulsar://b1:6650,pulsar://user:p4ssw0rd@b2:6650"),
        ("EVENTBUS_URL", "pulsar://user:p4ssw0rd@broker:6650/path"),
        ("EVENTBUS_ADMIN_URL", "http://admin:p4ssw0rd@broker:8080"),
    ],
)
def test_a_url_with_a_password_is_refused_without_printing_it(name: str, value: str, base_env: dict[str, str]) -> None:
    """Credentials in a URL are never echoed: not in the error line, nor in a settings repr (nothing to repr)."""
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "status", "--topic", "t", "--group", "g"],
        env={**base_env, name: value}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "p4ssw0rd" not in result.stdout + result.stderr, result.stderr
    assert "***@" in result.stderr and ("has a path" in result.stderr or "carries a user or password" in result.stderr)
