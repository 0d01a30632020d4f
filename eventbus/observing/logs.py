"""Log lines and terminal text that never fail: the JSON formatter, the logging set-up, control characters escaped."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from ..context import CURRENT

#: Fields a handler's log lines carry (`extra=`), shown by the JSON format.
FIELDS = ("worker", "topic", "group", "message_id", "key", "attempt", "trace_id")


def printable(text: str) -> str:
    """`text` on one terminal line: control and format characters, newlines, lone surrogates escaped (``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def safe_text(value: object) -> str:
    """`str(value)` as valid UTF-8, whatever `value` is: a failing `__str__` or lone surrogates included."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception as exc:  # a __str__ that raises must not cost the record
        text = f"<{type(value).__name__} whose str() raised {type(exc).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field(value: object) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return safe_text(value)


def message_of(record: logging.LogRecord) -> str:
    """The record's message; when its arguments do not fit its format, the format and the arguments as they are."""
    try:
        return safe_text(record.getMessage())
    except Exception:
        return safe_text(f"{safe_text(record.msg)} {' '.join(safe_text(a) for a in _args(record))}")


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    if isinstance(args, tuple):
        return args
    return () if args is None else (args,)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, a handler line's fields, the traceback.

    Every value is made encodable first, so no record is lost to its contents (a handler's error text with a
    lone surrogate from `os.fsdecode` made orjson refuse the line, and logging printed a traceback instead).
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": safe_text(record.levelname),
            "logger": safe_text(record.name),
            "message": message_of(record),
        }
        for name in FIELDS:
            if hasattr(record, name):
                line[name] = _field(getattr(record, name))
        if record.exc_info:
            try:
                line["exception"] = safe_text(self.formatException(record.exc_info))
            except Exception as exc:
                line["exception"] = f"<the traceback could not be formatted: {type(exc).__name__}>"
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    """The text format with each record's message on one line: a payload's newline cannot forge a log line.

    The message is escaped as `printable` does (JSON mode escapes it too); a traceback keeps its lines, each
    indented and escaped, so an error text's newline starts no line where a record's time would be.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = logging.makeLogRecord({**record.__dict__, "msg": printable(message_of(record)), "args": None})
        return super().format(line)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (the stdlib's name)
        return "\n".join("  " + printable(line) for line in super().formatException(ei).splitlines())


class _Worker(logging.Filter):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.number
        return True


class MessageFields(logging.Filter):
    """Gives a record made during a handler attempt that message's fields (topic, group, message_id, key, attempt).

    So a handler's own `log.info(...)` lines tell which message they are about, as the bus's lines do.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        attempt = CURRENT.get()
        if attempt is not None and attempt.active:
            for name, value in attempt.fields().items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


def setup_logging(level: str, form: str = "text", worker: int | None = None) -> None:
    """Logging to stderr at `level`, as text or JSON lines; the client's and httpx's chatter held back.

    `worker`: the number `eventbus run --workers N` gave this process, on every line (text: after the logger's
    name; JSON: a `worker` field), so the processes' lines can be told apart.
    """
    named = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
    text = TextFormatter(f"%(asctime)s %(levelname)-7s {named}: %(message)s", datefmt="%H:%M:%S")
    logging.basicConfig(level=level, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if form == "json":
            handler.setFormatter(JsonFormatter())
            handler.addFilter(MessageFields())
        elif type(handler.formatter) in (logging.Formatter, TextFormatter):  # ours, not a test runner's
            handler.setFormatter(text)
        if worker is not None:
            handler.addFilter(_Worker(worker))
    # The C++ client is chatty at INFO (every connection and lookup).
    logging.getLogger("eventbus.pulsar").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # httpx logs each request at INFO (eventbus status asks the admin API a few times per subscription).
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
