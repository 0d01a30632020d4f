"""Connecting: the embedded broker or the configured one, a handshake first, then one client."""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
from dataclasses import dataclass
from importlib import metadata

import anyio

from ..errors import AuthenticationFailed, BrokerUnavailable, ConfigError
from ..settings import Settings, broker_addresses
from .bridge import LoopBridge
from .client import Client
from .embedded import EmbeddedBroker
from .handshake import HandshakeRejected, handshake
from .profile import BrokerProfile

log = logging.getLogger("eventbus")


@dataclass
class Connection:
    """One client, the broker it reaches and the bridge its callbacks come home through."""

    url: str
    client: Client
    profile: BrokerProfile
    bridge: LoopBridge

    async def close(self) -> None:
        """Close the client, then release the embedded broker (the last user stops it)."""
        try:
            await self.client.close()
        except Exception as exc:
            log.warning("closing client: %s", exc)
        gc.collect()  # release the client's objects here, not in interpreter teardown
        if self.profile.embedded is not None:
            await anyio.to_thread.run_sync(self.profile.embedded.release)


async def connect(settings: Settings) -> Connection:
    """Start or join the embedded broker, or check the configured one answers; then open the client."""
    try:
        token = settings.jwt()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    bridge = LoopBridge(asyncio.get_running_loop())
    embedded = None
    if settings.uses_embedded:
        embedded = await anyio.to_thread.run_sync(EmbeddedBroker.acquire, settings.data_dir)
        url, token = embedded.url, None  # it has no authentication: a token sent there only leaves this process
    else:
        url = settings.url
    try:
        version = await _check_broker(url, token, settings)
        if embedded is not None:
            # pulsar-lite's handshake names a version of its own protocol code, not the package's.
            version = f"Pulsar-Lite-{metadata.version('pulsar-lite')}"
            log.info(
                "embedded broker (pulsar-lite %s) at %s, data in %s: set EVENTBUS_URL to use another broker",
                metadata.version("pulsar-lite"), url, embedded.data_dir,
            )
        client = Client(
            url,
            token=token,
            operation_timeout_seconds=settings.operation_timeout_seconds,
            connection_timeout_ms=settings.connection_timeout_ms,
            log_level=settings.log_level,
            tls_trust_certs_file=settings.tls_trust_certs_file,
            tls_validate_hostname=settings.tls_validate_hostname,
        )
    except BaseException:
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.release)
        raise
    return Connection(url, client, BrokerProfile(version, embedded), bridge)


async def _check_broker(url: str, token: str | None, settings: Settings) -> str:
    """Reach the broker and shake hands before the client would retry blindly for 30 s."""
    tls = None
    if url.startswith("pulsar+ssl://"):
        cafile = str(settings.tls_trust_certs_file) if settings.tls_trust_certs_file else None
        tls = ssl.create_default_context(cafile=cafile)
        tls.check_hostname = settings.tls_validate_hostname
    errors = []
    for host, port in broker_addresses(url):
        try:
            return await handshake(host, port, token, tls, settings.connection_timeout_ms / 1000)
        except HandshakeRejected as exc:
            if exc.error == "AuthenticationError":
                raise AuthenticationFailed(
                    f"the broker at {host}:{port} rejected authentication "
                    + ("(AuthenticationError): check EVENTBUS_TOKEN" if token else "(AuthenticationError): it needs a token, set EVENTBUS_TOKEN")
                ) from None
            errors.append(f"{host}:{port} ({exc})")
        except ssl.SSLError as exc:
            raise ConfigError(
                f"TLS with the broker at {host}:{port} failed ({exc.reason or exc}): set EVENTBUS_TLS_TRUST_CERTS_FILE "
                "to the CA that signed the broker's certificate"
            ) from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            errors.append(f"{host}:{port} ({reason})")
    raise BrokerUnavailable(f"cannot reach the broker at {', '.join(errors)}: is it running, and is EVENTBUS_URL right?")
