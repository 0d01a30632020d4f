"""A Pulsar protocol handshake, to tell "wrong token" from "no broker" at once.

The C++ client treats a rejected CONNECT as a connection error and retries
until the operation timeout, then reports only "Timeout". One CONNECT of our
own, before the client starts, turns that into a clear error in milliseconds.
Only the few fields of PulsarApi.proto that a handshake needs are encoded here (and read by `wire.fields`).
"""

from __future__ import annotations

import asyncio
import ssl
import struct

from .wire import fields

_CONNECT, _CONNECTED, _ERROR = 2, 3, 14
_PROTOCOL_VERSION = 19
_SERVER_ERRORS = {3: "AuthenticationError", 4: "AuthorizationError", 17: "ServiceNotReady", 19: "TooManyRequests"}


class HandshakeRejected(Exception):
    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}" if message else error)
        self.error = error


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def connect_frame(token: str | None) -> bytes:
    connect = _field(1, b"eventbus-handshake") + _field(4, _PROTOCOL_VERSION)
    if token:
        connect += _field(5, b"token") + _field(3, token.encode())
    command = _field(1, _CONNECT) + _field(2, connect)
    return struct.pack(">II", len(command) + 4, len(command)) + command


async def handshake(host: str, port: int, token: str | None, tls: ssl.SSLContext | None, timeout: float) -> str:
    """CONNECT and read the answer: the server's version, or HandshakeRejected, OSError, TimeoutError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None)
        try:
            writer.write(connect_frame(token))
            await writer.drain()
            total, size = struct.unpack(">II", await reader.readexactly(8))
            command = fields(await reader.readexactly(size))
            await reader.readexactly(total - 4 - size)
        finally:
            writer.close()
    kind = command.get(1)
    connected, error = command.get(3), command.get(14)
    if kind == _CONNECTED and isinstance(connected, bytes):
        version = fields(connected).get(1, b"")
        return version.decode(errors="replace") if isinstance(version, bytes) else ""
    if kind == _ERROR and isinstance(error, bytes):
        found = fields(error)
        code, message = found.get(2, 0), found.get(3, b"")
        name = _SERVER_ERRORS.get(code, f"ServerError {code!r}") if isinstance(code, int) else "ServerError"
        raise HandshakeRejected(name, message.decode(errors="replace") if isinstance(message, bytes) else "")
    raise HandshakeRejected("UnexpectedResponse", f"command type {kind!r}")
