from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timezone
from typing import Any

import hypothesis
import hypothesis.strategies
import pytest
from pydantic import BaseModel

from eventbus.codec import BINARY, JSON, DecodeError, decoder_for, encode


class Item(BaseModel):
    sku: str
    qty: int


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_encodes_each_kind() -> None:
    assert encode(Item(sku="a", qty=1)) == (b'{"sku":"a","qty":1}', JSON)
    assert encode(Point(1, 2)) == (b'{"x":1,"y":2}', JSON)
    assert encode({"items": [Item(sku="a", qty=1)]}) == (b'{"items":[{"sku":"a","qty":1}]}', JSON)
    assert encode([1, None]) == (b"[1,null]", JSON)
    assert encode(3.5) == (b"3.5", JSON)
    assert encode("hi") == (b'"hi"', JSON)
    assert encode(b"\x00") == (b"\x00", BINARY)
    assert encode(bytearray(b"ab")) == (b"ab", BINARY)
    u = uuid.UUID(int=1)
    assert encode({"at": datetime(2026, 1, 1, tzinfo=timezone.utc), "id": u})[0] == (
        b'{"at":"2026-01-01T00:00:00+00:00","id":"00000000-0000-0000-0000-000000000001"}'
    )


def test_unencodable_names_its_type() -> None:
    with pytest.raises(TypeError, match=r"cannot encode payload of type set"):
        encode({1, 2})
    with pytest.raises(TypeError, match=r"of type dict: .*object"):
        encode({"x": object()})


@pytest.mark.parametrize(
    ("annotation", "data", "expected"),
    [
        (Item, b'{"sku":"a","qty":"2"}', Item(sku="a", qty=2)),
        (dict, b'{"a":1}', {"a": 1}),
        (list, b"[1]", [1]),
        (Any, b"null", None),
        (bytes, b"\xff", b"\xff"),
        (str, "é".encode(), "é"),
        (int, b"7", 7),
        (Point, b'{"x":1,"y":2}', Point(1, 2)),
    ],
)
def test_decodes_by_annotation(annotation: Any, data: bytes, expected: Any) -> None:
    assert decoder_for(annotation)(data) == expected


@pytest.mark.parametrize(
    ("annotation", "data", "words"),
    [
        (Item, b'{"sku":"a"}', "qty: Field required"),
        (Item, b"not json", "Invalid JSON"),
        (dict, b"[1]", "expected a JSON dict, got list"),
        (dict, b"{", "not valid JSON"),
        (str, b"\xff\xfe", "not valid UTF-8"),
        (int, b'"x"', "does not validate as int"),
    ],
)
def test_decode_errors_say_what_is_wrong(annotation: Any, data: bytes, words: str) -> None:
    with pytest.raises(DecodeError, match=words):
        decoder_for(annotation)(data)


@hypothesis.given(hypothesis.strategies.text())
def test_a_str_published_is_the_str_a_str_handler_gets(text: str) -> None:
    """publish("pricing", "tea") writes the JSON string; a `sku: str` handler got '"tea"' with its quotes."""
    assert decoder_for(str)(encode(text)[0]) == text


def test_text_from_other_producers_stays_as_it_is() -> None:
    decode = decoder_for(str)
    assert decode(b"plain text") == "plain text"
    assert decode(b'"not" json"') == '"not" json"'
    assert decode("caf\u00e9".encode()) == "caf\u00e9"


@pytest.mark.parametrize("target", [dict, Any, Item])
def test_json_nested_100000_deep_is_refused_as_undecodable(target: Any) -> None:
    """A message's author writes the payload: nesting is bounded, not a stack overflow (SECURITY.md)."""
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    with pytest.raises(DecodeError, match="depth limit|recursion limit"):
        decoder_for(target)(deep)
