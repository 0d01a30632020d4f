"""`eventbus run|publish`: the worker and a one-shot publisher."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import orjson
from pydantic import ValidationError

from .bus import EventBus
from .client import id_text
from .errors import ConfigError, EventBusError
from .registry import Router, default_router
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


def _import(module: str) -> object:
    if module.endswith(".py") or "/" in module:
        dotted = module.removesuffix(".py").strip("./").replace("/", ".")
        raise _Fail(f"{module!r} is a path: name the module instead, `run {dotted}`", EXIT_USAGE)
    try:
        return importlib.import_module(module)
    except ValueError as exc:  # bad @subscribe options
        raise _Fail(f"cannot load handlers from {module!r}: {exc}", EXIT_USAGE) from None
    except TypeError as exc:
        raise _Fail(f"cannot load handlers from {module!r}: {exc}{_subscribe_hint(str(exc))}", EXIT_USAGE) from None
    except Exception as exc:
        raise _Fail(f"cannot import handler module {module!r}: {type(exc).__name__}: {exc}", EXIT_USAGE) from None


def _subscribe_hint(error: str) -> str:
    """What to write instead, for the mistakes Python words for the decorator rather than for its user."""
    if "missing 1 required positional argument: 'group'" in error:
        return ' (@subscribe needs a topic and a group: write @subscribe("orders", "billing"))'
    unknown = re.search(r"unexpected keyword argument '(\w+)'", error)
    if unknown:
        options = [p for p in inspect.signature(Router.subscribe).parameters if p not in ("self", "topic", "group")]
        close = difflib.get_close_matches(unknown.group(1), options, n=1)
        return f" (did you mean {close[0]}?)" if close else f" (the options are {', '.join(options)})"
    return ""


def _load(targets: Sequence[str], settings: Settings) -> EventBus:
    """The bus to run: the targets' routers (a plain module contributes the default registry), or their EventBus."""
    if not targets:
        raise _Fail(
            "name what to run: `run myapp.handlers` (a module using @subscribe) or `run myapp:router` "
            "(a Router, a list of routers, or an EventBus); the example app: `run handlers handlers.demo`",
            EXIT_USAGE,
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` has it
    routers: list[Router] = []
    buses: list[EventBus] = []
    for target in targets:
        module_name, _, attribute = target.partition(":")
        module = _import(module_name)
        if not attribute:
            if default_router not in routers:
                routers.append(default_router)
            continue
        try:
            value = getattr(module, attribute)
        except AttributeError:
            raise _Fail(f"module {module_name!r} has no attribute {attribute!r}", EXIT_USAGE) from None
        if isinstance(value, EventBus):
            buses.append(value)
        elif isinstance(value, Router):
            routers.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(r, Router) for r in value):
            routers.extend(value)
        else:
            raise _Fail(
                f"{target} is a {type(value).__name__}: name a Router, a list of routers, or an EventBus", EXIT_USAGE
            )
    if buses:
        if len(buses) > 1 or routers:
            raise _Fail("an EventBus target runs alone: name one EventBus, or routers and modules", EXIT_USAGE)
        return buses[0]
    return EventBus(settings, routers=routers)


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
            asyncio.run(_run(_load(args.targets, settings)))
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
