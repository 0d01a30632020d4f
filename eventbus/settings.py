"""Configuration, read from the environment and `.env` (prefix ``EVENTBUS_``)."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError

_DEFAULT_PORTS = {"pulsar": 6650, "pulsar+ssl": 6651}


def normalize_service_url(url: str) -> str:
    """Return the service URL in the form pulsar-client expects.

    The seed deployment writes several brokers as
    ``pulsar://b1:6650,pulsar://b2:6650``; the client wants one scheme and a
    comma-separated host list: ``pulsar://b1:6650,b2:6650``.
    """
    url = redacted(url.strip())  # only what an error may print: a URL with credentials is refused below
    if not url:
        return ""
    scheme = None
    hosts: list[str] = []
    for part in url.split(","):
        part = part.strip()
        if "://" in part:
            parsed = urlsplit(part)
            part_scheme = parsed.scheme
            if scheme is None:
                scheme = part_scheme
            elif part_scheme != scheme:
                raise ValueError(
                    f"broker URL mixes schemes {scheme!r} and {part_scheme!r}: use one scheme for every broker"
                )
            if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
                raise ValueError(f"broker URL {part!r} has a path or query: write it as pulsar://host:port")
            netloc = parsed.netloc
        elif scheme is not None:
            netloc = part.rstrip("/")
        else:
            raise ValueError(f"broker URL {url!r} has no scheme: write it as pulsar://host:6650")
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(
                f"broker URL scheme {scheme!r} is not supported: use pulsar:// or pulsar+ssl://"
            )
        if "@" in netloc:
            raise ValueError(
                f"broker URL {url!r} carries a user or password: the client authenticates with EVENTBUS_TOKEN; "
                f"write the URL as {scheme}://host:port"
            )
        if not netloc:
            raise ValueError(f"broker URL {url!r} has no host: write it as {scheme}://host:port")
        if netloc.startswith("["):  # IPv6 literal: [::1]:6650
            host, _, rest = netloc.partition("]")
            host += "]"
            port = rest.removeprefix(":")
        else:
            host, sep, port = netloc.rpartition(":")
            if not sep:
                host, port = netloc, ""
        if not host:
            raise ValueError(f"broker URL {url!r} has an empty host: write it as {scheme}://host:port")
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"broker URL {url!r} has an invalid port {port!r}: use 1-65535")
        else:
            port = str(_DEFAULT_PORTS[scheme])
        hosts.append(f"{host}:{port}")
    return f"{scheme}://{','.join(hosts)}"


def redacted(url: str) -> str:
    """`url` with any user and password in it replaced by ``***``, for messages (several comma-separated too)."""
    return _USERINFO.sub(r"\1***@", url)


_USERINFO = re.compile(r"((?:^|,)\s*[A-Za-z][A-Za-z0-9+.-]*://)[^/@,]*@")


def broker_addresses(url: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of a normalised service URL."""
    rest = url.split("://", 1)[1]
    out = []
    for hostport in rest.split(","):
        host, _, port = hostport.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def admin_urls(settings: Settings) -> list[str]:
    """The admin API's base URLs: EVENTBUS_ADMIN_URL's (comma-separated), else each broker's host on port 8080."""
    if settings.admin_url:
        return [url.strip().rstrip("/") for url in settings.admin_url.split(",") if url.strip()]
    scheme = "https" if settings.url.startswith("pulsar+ssl://") else "http"
    return [f"{scheme}://{host}:8080" for host, _ in broker_addresses(settings.url)]


class _CheckedDotEnv(PydanticBaseSettingsSource):
    """The `.env` source, refusing an `EVENTBUS_*` key that is not a setting, as the environment does.

    Only the prefixed keys are checked: a `.env` shared with other tools keeps their keys.
    """

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ hands over the inner source's values

    def __call__(self) -> dict[str, Any]:
        found: Mapping[str, str | None] = getattr(self._inner, "env_vars", {})
        problems = unknown_variables({name.upper(): value or "" for name, value in found.items()})
        if problems:
            where = getattr(self._inner, "env_file", None) or ".env"
            raise ValueError(f"in {where}: {'; '.join(problems)}")
        return self._inner()


class Settings(BaseSettings):
    """Everything the bus needs to know, from `EVENTBUS_*` variables or `.env`.

    >>> Settings(url="pulsar://localhost:6650", namespace="orders").namespace
    'orders'
    """

    model_config = SettingsConfigDict(
        env_prefix="EVENTBUS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    url: str = Field(
        default="",
        validation_alias=AliasChoices("url", "EVENTBUS_URL", "MQ_NAME_SERVER"),
        description="Broker service URL; empty starts the embedded broker.",
    )
    token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("token", "EVENTBUS_TOKEN", "PULSAR_JWT_TOKEN"),
        description="JWT for token authentication.",
    )
    token_file: Path | None = Field(default=None, description="File holding the JWT (read at start).")
    tenant: str = Field(
        default="public", min_length=1, pattern=r"^[A-Za-z0-9_.\-=:]+$", description="Tenant of short topic names."
    )
    namespace: str = Field(
        default="default", min_length=1, pattern=r"^[A-Za-z0-9_.\-=:]+$",
        description="Namespace of short topic names: `orders` is persistent://TENANT/NAMESPACE/orders.",
    )
    embedded: bool = Field(
        default=True,
        description="Start (or join) the embedded broker when no URL is set; false in production images.",
    )
    data_dir: Path = Field(default=Path(".eventbus"), description="Embedded broker data directory.")

    admin_url: str = Field(
        default="",
        description="Apache Pulsar's admin REST API, for `eventbus status`; empty: the broker's host, port 8080.",
    )
    admin_token: SecretStr | None = Field(
        default=None, description="JWT for the admin API (default: EVENTBUS_TOKEN); needs admin rights on the tenant."
    )

    tls_trust_certs_file: Path | None = Field(default=None, description="CA bundle to trust for pulsar+ssl:// URLs.")
    tls_validate_hostname: bool = Field(default=True, description="The broker's name must match its certificate.")

    operation_timeout_seconds: int = Field(default=30, ge=1, description="Subscribe, create a producer, close: seconds.")
    connection_timeout_ms: int = Field(default=10_000, ge=100, description="TCP connect to a broker: milliseconds.")

    producer_batching_max_messages: int = Field(
        default=1000, ge=2, description="Messages per batch at most; the client refuses fewer than 2."
    )
    producer_batching_max_bytes: int = Field(default=1024 * 1024, ge=1024, description="Bytes per batch at most.")
    producer_batching_max_delay_ms: int = Field(
        default=1, ge=0, description="How long a batch waits to fill while an earlier one awaits its receipt (ms)."
    )
    producer_compression: Literal["none", "lz4", "zlib", "zstd", "snappy"] = Field(
        default="lz4", description="Batch compression (LZ4 and 1 ms were chosen by measurement: Benchmarks)."
    )
    producer_send_timeout_ms: int = Field(
        default=120_000, ge=0,
        description="The publish deadline: how long a publish waits for the broker's confirmation. Longer than a "
        "broker failover (the client resends to the topic's new owner meanwhile); past it the client fails every "
        "message it holds for that topic with Timeout. 0: wait forever.",
    )
    producer_max_pending_messages: int = Field(
        default=10_000, ge=1, description="Unconfirmed messages a producer holds at most; publish waits beyond that."
    )
    producer_name: str | None = Field(
        default=None,
        description="A stable producer name: with broker deduplication on, a resent sequence id is stored once.",
    )
    deduplication: bool | None = Field(
        default=None,
        description="Whether the namespace deduplicates (effectively_once subscriptions need it); empty: the worker "
        "asks the admin API at start (EVENTBUS_ADMIN_URL, EVENTBUS_ADMIN_TOKEN).",
    )

    send_deadline_seconds: float = Field(
        default=60.0, gt=0,
        description="How long `eventbus publish` and each resend of `eventbus dlq replay` wait for the broker's "
        "confirmation before the command gives up (exit 1).",
    )

    consumer_receiver_queue_size: int = Field(default=1000, ge=1, description="Messages the client prefetches per consumer.")
    consumer_max_in_flight: int = Field(
        default=1000, ge=1, description="Messages a subscription holds unacknowledged at most."
    )
    consumer_max_in_flight_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1,
        description="Payload bytes a subscription takes from the client's queue and holds unacknowledged at most "
        "(one message at least); the queue itself holds up to EVENTBUS_CONSUMER_RECEIVER_QUEUE_SIZE messages more.",
    )

    shutdown_drain_timeout: float = Field(
        default=30.0, ge=0, description="On SIGINT/SIGTERM, how long in-flight handlers may take to finish (s)."
    )
    shutdown_exit_timeout: float = Field(
        default=10.0, ge=0, description="After the drain: how long the lifespans' exits and app-scoped cleanups may take in all."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="CRITICAL: nothing from the Pulsar client at all (the one-shot commands' level)."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line.")

    metrics: bool = Field(default=False, description="Collect metrics (on by itself when EVENTBUS_METRICS_PORT is set).")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve /metrics, /livez and /readyz on this port while the worker runs."
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the metrics server binds: 0.0.0.0 in a container, for the orchestrator."
    )
    liveness_stall_seconds: float = Field(
        default=10.0, gt=0, description="/livez fails once the event loop has not run for this long."
    )

    def __init__(self, **values: Any) -> None:
        """Raises `ConfigError` naming each bad setting, as the command line does: an unknown name too."""
        unknown = [name for name in values if not name.startswith("_") and name not in _accepted_names()]
        if unknown:
            raise ConfigError("; ".join(f"Settings({name}=...): {_closest(name)}" for name in unknown))
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(settings_problem(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _CheckedDotEnv(dotenv_settings), file_secret_settings

    @field_validator("url", mode="before")
    @classmethod
    def _normalize_url(cls, value: object) -> object:
        return normalize_service_url(value) if isinstance(value, str) else value

    @field_validator("admin_url", mode="before")
    @classmethod
    def _no_credentials(cls, value: object) -> object:
        if isinstance(value, str) and redacted(value) != value:
            raise ValueError(
                f"admin URL {redacted(value)!r} carries a user or password: the admin API takes "
                "EVENTBUS_ADMIN_TOKEN; write it as http://host:8080"
            )
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems = unknown_variables(os.environ)
        if problems:
            raise ValueError("; ".join(problems))
        if not self.url and not self.embedded:
            raise ValueError("no broker URL: set EVENTBUS_URL (EVENTBUS_EMBEDDED=false turns the embedded broker off)")
        return self

    @property
    def collects_metrics(self) -> bool:
        return self.metrics or self.metrics_port is not None

    @property
    def uses_embedded(self) -> bool:
        """True when no broker URL is set and the embedded broker is used."""
        return not self.url

    def jwt(self) -> str | None:
        """The token to authenticate with: `token`, or the contents of `token_file`."""
        if self.token is not None:
            return self.token.get_secret_value() or None
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip() or None
            except OSError as exc:
                raise ValueError(
                    f"cannot read token file {self.token_file}: {exc.strerror}; "
                    "set EVENTBUS_TOKEN_FILE to a readable file"
                ) from None
        return None

    def admin_headers(self) -> dict[str, str]:
        """The admin API's authorization: `admin_token`, else the client's token."""
        token = self.admin_token.get_secret_value() if self.admin_token else self.jwt()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def topic(self, name: str) -> str:
        """Resolve a short topic name in the configured tenant and namespace."""
        problem = topic_problem(name)
        if problem:
            raise ValueError(problem)
        if "://" in name:
            return name
        return f"persistent://{self.tenant}/{self.namespace}/{name}"


def settings_problem(exc: ValidationError) -> str:
    """One line for what pydantic found wrong, each problem naming its variable."""
    problems = "; ".join(
        (f"EVENTBUS_{str(e['loc'][0]).upper()}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
        for e in exc.errors()
    )
    return f"invalid settings: {problems} (see .env.example)"


def _accepted_names() -> set[str]:
    names = set(Settings.model_fields)
    for info in Settings.model_fields.values():
        if isinstance(info.validation_alias, AliasChoices):
            names.update(a for a in info.validation_alias.choices if isinstance(a, str))
    return names


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(Settings.model_fields), n=1, cutoff=0.6)
    return f"not a setting (did you mean {close[0]}?)" if close else "not a setting (see .env.example for the settings)"


def variable_names() -> dict[str, str]:
    """Every environment variable a setting reads, to its field name."""
    names = {}
    for field, info in Settings.model_fields.items():
        names[f"EVENTBUS_{field.upper()}"] = field
        if isinstance(info.validation_alias, AliasChoices):
            for alias in info.validation_alias.choices:
                if isinstance(alias, str) and alias.isupper():
                    names[alias] = field
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``EVENTBUS_*`` variable that is not a setting, with the closest real name."""
    known = variable_names()
    own = [name.removeprefix("EVENTBUS_") for name in known if name.startswith("EVENTBUS_")]
    problems = []
    for name in sorted(environ):
        if name.startswith("EVENTBUS_") and name not in known:
            rest = name.removeprefix("EVENTBUS_")
            # BROKER_URL holds URL; LOGLEVEL is close to LOG_LEVEL.
            close = difflib.get_close_matches(rest, own, n=1, cutoff=0.6) or [
                real for real in sorted(own, key=len, reverse=True) if real in rest.split("_")
            ][:1]
            hint = f"did you mean EVENTBUS_{close[0]}?" if close else "see .env.example for the settings"
            problems.append(f"{name} is not a setting ({hint})")
    return problems


_TOPIC_PART = re.compile(r"^[A-Za-z0-9_.\-=:]+$")


def topic_problem(name: str) -> str | None:
    """Why `name` cannot be a topic ('orders' or 'persistent://tenant/namespace/orders'), or None."""
    fix = "write 'orders' or 'persistent://tenant/namespace/orders'"
    if not isinstance(name, str) or not name.strip():
        return f"topic {name!r} is empty: {fix}"
    if "://" not in name:
        if "/" in name or not _TOPIC_PART.match(name):
            return f"topic {name!r} is neither a short name nor a full name: {fix}"
        return None
    scheme, _, rest = name.partition("://")
    parts = rest.split("/")
    if scheme not in ("persistent", "non-persistent") or len(parts) != 3 or not all(_TOPIC_PART.match(p) for p in parts):
        return f"topic {name!r} is not a full name (persistent://tenant/namespace/topic): {fix}"
    return None
