"""Payload encoding (publish side) and decoding by handler annotation (consume side)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

CONTENT_TYPE = "content-type"
JSON = "application/json"
BINARY = "application/octet-stream"

Decoder = Callable[[bytes], Any]


class DecodeError(ValueError):
    """A payload that cannot be decoded or validated for its handler."""


def _default(obj: Any) -> Any:
    # orjson handles dataclasses, datetimes, UUIDs and enums itself; pydantic
    # models nested in dicts or lists need a hand.
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError


def encode(payload: Any) -> tuple[bytes, str]:
    """Encode a payload to bytes and name its content type.

    >>> encode({"id": 1})
    (b'{"id":1}', 'application/json')
    >>> encode(b"raw")
    (b'raw', 'application/octet-stream')
    """
    if isinstance(payload, bytes):
        return payload, BINARY
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload), BINARY
    if isinstance(payload, BaseModel):
        return payload.__pydantic_serializer__.to_json(payload), JSON
    try:
        return orjson.dumps(payload, default=_default), JSON
    except TypeError as exc:
        raise TypeError(
            f"cannot encode payload of type {type(payload).__qualname__}: {exc}; "
            "publish bytes, a pydantic model, a dataclass, a dict, a list or a scalar"
        ) from None


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"payload is not valid JSON: {exc}") from None


def _raw(data: bytes) -> bytes:
    return data


def _utf8(data: bytes) -> str:
    """The text: a JSON string as `publish` writes a `str` ("tea" for `"tea"`), anything else as UTF-8 as it is."""
    if data[:1] == b'"' and data[-1:] == b'"':
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, str):
            return value
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"payload is not valid UTF-8: {exc}") from None


def _typed_json(kind: type) -> Decoder:
    def decode(data: bytes) -> Any:
        value = _loads(data)
        if not isinstance(value, kind):
            raise DecodeError(f"expected a JSON {kind.__name__}, got {type(value).__name__}")
        return value

    return decode


def _validator(annotation: Any) -> Decoder:
    validate: Callable[[bytes], Any]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        validate = annotation.model_validate_json
    else:
        validate = TypeAdapter(annotation).validate_json

    def decode(data: bytes) -> Any:
        try:
            return validate(data)
        except ValidationError as exc:
            raise _invalid(annotation, exc) from None

    return decode


def _invalid(annotation: Any, exc: ValidationError) -> DecodeError:
    """The `DecodeError` naming the type and the first five of pydantic's complaints."""
    errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
    return DecodeError(f"payload does not validate as {_name(annotation)}: {errors}")


def value_validator(annotation: Any) -> Callable[[Any], Any]:
    """Turn a value already decoded (an Avro record's fields) into a handler's payload type; `DecodeError` if not."""
    if annotation is inspect.Parameter.empty or annotation is Any or annotation is object:
        return lambda value: value
    validate = TypeAdapter(annotation).validate_python

    def convert(value: Any) -> Any:
        try:
            return validate(value)
        except ValidationError as exc:
            raise _invalid(annotation, exc) from None

    return convert


def _name(annotation: Any) -> str:
    return getattr(annotation, "__qualname__", None) or repr(annotation)


def decoder_for(annotation: Any) -> Decoder:
    """Pick how a handler's payload parameter is decoded from its annotation.

    Raises `TypeError` (at registration) for annotations pydantic cannot build a
    validator for.
    """
    if annotation is inspect.Parameter.empty or annotation is Any or annotation is object:
        return _loads
    if annotation is bytes:
        return _raw
    if annotation is str:
        return _utf8
    if annotation is dict or annotation is list:
        return _typed_json(annotation)
    try:
        return _validator(annotation)
    except Exception:  # pydantic raises several kinds, with advice for its own models that does not apply here
        raise TypeError(
            f"cannot decode payloads as {_name(annotation)}: pydantic cannot validate that type; annotate the "
            "payload with a pydantic model, a dataclass, a TypedDict, dict, list, str or bytes"
        ) from None
