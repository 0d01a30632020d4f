"""`eventbus run|docs|publish`: the worker, the app's AsyncAPI document, and a one-shot publisher."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import orjson
from pydantic import ValidationError

from .app import load, resolve
from .asyncapi import document
from .bus import EventBus
from .client import id_text
from .errors import ConfigError, EventBusError
from .settings import Settings

log = logging.getLogger("eventbus")

EXIT_RUNTIME = EventBusError.exit_code
EXIT_USAGE = ConfigError.exit_code
#: The settings `--help` lists; .env.example has them all.
_MAIN_SETTINGS = (
    "url", "token", "tenant", "namespace", "embedded", "data_dir", "log_level", "log_format", "metrics_port",
    "metrics_host", "shutdown_drain_timeout",
)
#: Fields a handler's log lines carry (`extra=`), shown by the JSON format.
_FIELDS = ("topic", "group", "message_id", "key", "attempt", "trace_id")


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _settings_help() -> str:
    lines = ["settings (environment or .env; every one is in .env.example):"]
    for name in _MAIN_SETTINGS:
        field = Settings.model_fields[name]
        default = "" if field.default in (None, "") else f" (default {field.default})"
        lines.append(f"  EVENTBUS_{name.upper():<26} {field.description or ''}{default}")
    return "\n".join(lines)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Event bus on Apache Pulsar.", epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('eventbus')}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run handlers until SIGINT/SIGTERM", epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import each target and run its handlers until SIGINT/SIGTERM. A target is a module "
        "whose handlers use @subscribe, or module:attribute naming a Router, a list of routers, or an EventBus.",
    )
    run.add_argument("targets", nargs="*", metavar="MODULE[:ATTRIBUTE]")
    run.add_argument(
        "--metrics-port", type=_port, default=None, metavar="PORT",
        help="serve /metrics, /livez and /readyz on PORT (as EVENTBUS_METRICS_PORT)",
    )
    docs = commands.add_parser(
        "docs", help="write the app's AsyncAPI 3.0 document",
        description="Import each target (as `run` takes them) and write an AsyncAPI 3.0 document: a channel per "
        "topic, a receive operation per subscription (group, type, retries, dead-letter topic), the payload "
        "schemas from the handlers' annotations, and send operations for Router.publisher declarations.",
    )
    docs.add_argument("targets", nargs="*", metavar="MODULE[:ATTRIBUTE]")
    docs.add_argument("--out", "-o", default=None, metavar="FILE", help="write to FILE (default: stdout)")
    docs.add_argument("--format", choices=("json", "yaml"), default=None, help="default: yaml for a .yaml/.yml FILE, else json")
    docs.add_argument("--title", default=None, help="info.title (default: the targets)")
    docs.add_argument("--app-version", default="0.1.0", help="info.version (default: 0.1.0)")
    publish = commands.add_parser(
        "publish", help="publish one JSON message and print its id", epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("topic")
    publish.add_argument("json", help="the payload as JSON; - reads it from stdin, @PATH from a file")
    publish.add_argument("--key", default=None)
    publish.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE")
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, a handler line's fields, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"EVENTBUS_{str(e['loc'][0]).upper()}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise _Fail(f"invalid settings: {problems} (see .env.example)", EXIT_USAGE) from None


def _setup_logging(level: str, form: str = "text") -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    if form == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JsonFormatter())
    # The C++ client is chatty at INFO (every connection and lookup).
    logging.getLogger("eventbus.pulsar").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


async def _run(bus: EventBus) -> None:
    async with bus:
        log.info("worker connected to %s", bus.url)
        await bus.run()
    log.info("worker stopped")


def _payload_text(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    if arg.startswith("@"):
        try:
            return Path(arg[1:]).read_text()
        except OSError as exc:
            raise _Fail(f"cannot read the payload from {arg[1:]}: {exc.strerror}", EXIT_USAGE) from None
    return arg


def _docs(settings: Settings, args: argparse.Namespace) -> None:
    routers, _ = resolve(args.targets)
    doc = document(routers, settings, title=args.title or " ".join(args.targets), version=args.app_version)
    form = args.format or ("yaml" if args.out and args.out.endswith((".yaml", ".yml")) else "json")
    if form == "yaml":
        try:
            import yaml
        except ImportError:
            raise _Fail("--format yaml needs PyYAML: pip install pyyaml (or use --format json)", EXIT_USAGE) from None
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    else:
        text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return
    try:
        Path(args.out).write_text(text)
    except OSError as exc:
        raise _Fail(f"cannot write {args.out}: {exc.strerror}", EXIT_USAGE) from None


async def _publish(settings: Settings, args: argparse.Namespace) -> None:
    settings.topic(args.topic)  # a name that cannot work fails before any broker starts
    try:
        payload = orjson.loads(_payload_text(args.json))
    except orjson.JSONDecodeError as exc:
        raise _Fail(f"the payload is not valid JSON ({exc}): quote it, e.g. '{{\"id\": 1}}'", EXIT_USAGE) from None
    properties = {}
    for item in args.property:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _Fail(f"--property {item!r} is not NAME=VALUE", EXIT_USAGE)
        properties[name] = value
    async with EventBus(settings, routers=[]) as bus:
        message_id = await bus.publish(args.topic, payload, key=args.key, properties=properties or None)
    print(id_text(message_id))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = _parser(prog or Path(sys.argv[0]).name).parse_args(argv)
    try:
        settings = _settings()
        _setup_logging(settings.log_level, settings.log_format)
        if args.command == "run":
            if args.metrics_port is not None:
                settings = settings.model_copy(update={"metrics_port": args.metrics_port})
            asyncio.run(_run(load(args.targets, settings)))
        elif args.command == "docs":
            _docs(settings, args)
        else:
            asyncio.run(_publish(settings, args))
    except _Fail as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except EventBusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a topic name the settings cannot resolve
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def entry(prog: str | None = None) -> NoReturn:
    """The `eventbus` command and `python -m eventbus`: `main()`, then exit without interpreter teardown."""
    code = main(prog=prog)
    # Everything is closed by now; skipping interpreter teardown keeps the C++
    # client's static destructors from racing Python's finalisation.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
