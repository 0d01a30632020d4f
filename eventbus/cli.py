"""`python -m eventbus run|publish`: the worker and a one-shot publisher."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import orjson
from pydantic import ValidationError

from .bus import EventBus
from .errors import ConfigError, EventBusError
from .registry import default_router
from .settings import Settings

log = logging.getLogger("eventbus")

EXIT_RUNTIME = EventBusError.exit_code
EXIT_USAGE = ConfigError.exit_code


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eventbus", description="Event bus on Apache Pulsar.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="import handler modules and run them until SIGINT/SIGTERM")
    run.add_argument("modules", nargs="*", default=["handlers"], help="modules to import (default: handlers)")
    publish = commands.add_parser("publish", help="publish one JSON message")
    publish.add_argument("topic")
    publish.add_argument("json", help="the payload, as JSON")
    publish.add_argument("--key", default=None)
    publish.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE")
    return parser


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise _Fail(f"invalid settings: {problems} (see .env.example)", EXIT_USAGE) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    # The C++ client is chatty at INFO (every connection and lookup).
    logging.getLogger("eventbus.pulsar").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def _import(modules: Sequence[str]) -> None:
    if "" not in sys.path:
        sys.path.insert(0, "")
    for name in modules:
        try:
            importlib.import_module(name)
        except (ValueError, TypeError) as exc:  # bad @subscribe options
            raise _Fail(f"cannot load handlers from {name!r}: {exc}", EXIT_USAGE) from None
        except Exception as exc:
            raise _Fail(f"cannot import handler module {name!r}: {type(exc).__name__}: {exc}", EXIT_USAGE) from None


async def _run(settings: Settings) -> None:
    async with EventBus(settings, routers=[default_router]) as bus:
        log.info("worker connected to %s", bus.url)
        await bus.run()
    log.info("worker stopped")


async def _publish(settings: Settings, args: argparse.Namespace) -> None:
    try:
        payload = orjson.loads(args.json)
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
    print(message_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings()
        _setup_logging(settings.log_level)
        if args.command == "run":
            _import(args.modules)
            asyncio.run(_run(settings))
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


def entry() -> NoReturn:
    """The `eventbus` command and `python -m eventbus`: `main()`, then exit without interpreter teardown."""
    code = main()
    # Everything is closed by now; skipping interpreter teardown keeps the C++
    # client's static destructors from racing Python's finalisation.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
