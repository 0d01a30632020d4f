"""Log lines and terminal text never fail on what they carry: each JSON line parses back, whatever it held."""

from __future__ import annotations

import io
import json
import logging
import signal
from pathlib import Path

from hypothesis import given, settings as hsettings, strategies as st

from eventbus import EventBus, Settings
from eventbus.observing.logs import JsonFormatter, printable

from .conftest import eventually
from .test_worker_process import Worker

_LONE = "\udcff"
_BIG = "x" * (1 << 20)


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__


def _lines(*records: tuple[str, tuple[object, ...], dict[str, object], bool]) -> list[dict[str, object]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.Logger("eventbus.test-logs")
    log.addHandler(handler)
    for msg, args, extra, with_exc in records:
        if with_exc:
            try:
                raise FileNotFoundError("cannot open report-" + _LONE + ".csv")
            except FileNotFoundError:
                log.error(msg, *args, extra=extra, exc_info=True)
        else:
            log.warning(msg, *args, extra=extra)
    text = out.getvalue()
    assert "Logging error" not in text
    return [json.loads(line) for line in text.split("\n") if line]  # JSON lines end at \n alone


def test_every_field_that_can_carry_odd_text_is_written_and_parses_back() -> None:
    lines = _lines(
        ("lone %s surrogate", (_LONE,), {"topic": "t" + _LONE, "key": b"\xff\xfe", "group": {1: "non-str key"}}, True),
        ("a failing __str__: %s", (_Unprintable(),), {"message_id": _Unprintable(), "attempt": 3}, False),
        ("%s %s", ("too few",), {}, False),  # arguments that do not fit the format
        (_BIG, (), {"topic": _BIG, "group": _BIG, "message_id": _BIG, "key": _BIG, "trace_id": _BIG}, True),
    )
    assert len(lines) == 4
    surrogate, unprintable, misfit, big = lines
    assert surrogate["message"] == "lone \\udcff surrogate" and surrogate["topic"] == "t\\udcff"
    assert surrogate["key"] == "\\xff\\xfe" and surrogate["group"] == "{1: 'non-str key'}"
    assert "report-\\udcff.csv" in str(surrogate["exception"])
    assert unprintable["message"].startswith("a failing __str__: <_Unprintable whose str() raised RuntimeError>") or (
        "RuntimeError" in unprintable["message"]
    )
    assert unprintable["message_id"] == "<_Unprintable whose str() raised RuntimeError>" and unprintable["attempt"] == 3
    assert misfit["message"] == "%s %s too few"
    assert big["message"] == _BIG and all(big[f] == _BIG for f in ("topic", "group", "message_id", "key", "trace_id"))


@hsettings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=())))
def test_any_text_makes_a_json_line_and_a_printable_one(text: str) -> None:
    [line] = _lines(("%s", (text,), {"topic": text, "key": text}, False))
    assert set(line) >= {"message", "topic", "key"}
    shown = printable(text)
    assert shown.isprintable(), "no control, format or unassigned character, no lone surrogate, on one line"
    assert shown == text or "\\" in shown


async def dead_letter_log(
    settings: Settings, env: dict[str, str], app: str, log: Path, payload: object, key: str | None = None
) -> str:
    """What a worker of `app` (on env's EB_TOPIC) logs from its start to its stop, one message dead-lettered between."""
    worker = Worker(env, log, app)
    try:
        await worker.wait_subscribed()
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(env["EB_TOPIC"], payload, key=key)
        await eventually(lambda: "dead-lettered" in worker.text(), what="the dead letter")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0
    finally:
        worker.kill()
    return worker.text()


async def test_a_handler_error_with_a_lone_surrogate_keeps_its_retry_and_dead_letter_lines(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**subprocess_env, "EB_TOPIC": topic, "EVENTBUS_LOG_FORMAT": "json"}
    text = await dead_letter_log(settings, env, "tests.apps.surrogate", tmp_path / "w.log", {"n": 1}, key="k1")
    assert "Logging error" not in text, text[-3000:]
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    levels = [r["level"] for r in records if "report-\\udcff.csv" in r["message"] + str(r.get("exception", ""))]
    assert levels == ["WARNING", "ERROR"], records


_FORGED = "12:00:00 ERROR   eventbus: forged"


async def test_a_payloads_newline_forges_no_line_in_the_text_log(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """The handler's error quotes the payload; its message and its traceback's last line carry the newline."""
    env = {**subprocess_env, "EB_TOPIC": topic, "EVENTBUS_LOG_FORMAT": "text"}
    payload = {"field": "x\n" + _FORGED + "\x1b[2J"}
    text = await dead_letter_log(settings, env, "tests.apps.quoting", tmp_path / "w.log", payload)
    assert not [line for line in text.splitlines() if line.startswith(_FORGED)], text[-3000:]
    assert "\x1b" not in text
    assert "dead-lettered" in text and "unknown field x\\n" + _FORGED + "\\x1b[2J" in text, text[-3000:]  # one line
    assert "\n  " + _FORGED + "\\x1b[2J\n" in text, text[-3000:]  # the traceback's lines: indented, escaped


@hsettings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=())))
def test_any_text_makes_one_text_line(text: str) -> None:
    from eventbus.observing.logs import TextFormatter

    record = logging.makeLogRecord({"msg": "got %s", "args": (text,), "levelname": "INFO", "name": "eventbus"})
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line.isprintable() and line.startswith("INFO eventbus: got ")
