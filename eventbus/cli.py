"""`eventbus run|docs|dlq|publish`: the worker, the AsyncAPI document, dead-letter tools, a one-shot publisher."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio
import orjson

from . import __version__
from .app import load, resolve
from .broker.client import id_text
from .bus import EventBus
from .errors import ConfigError, EventBusError
from .observing.logs import printable, setup_logging
from .registry import declared_schemas
from .operating import replay
from .operating.admin import Admin, check_dead_letters, namespace_topics
from .operating.asyncapi import document
from .running.supervisor import Supervisor
from .settings import Settings

log = logging.getLogger("eventbus")

#: Seconds a one-shot command waits for its connection to close once it has failed or finished.
_CLOSE_WAIT = 5.0
EXIT_RUNTIME = EventBusError.exit_code
EXIT_USAGE = ConfigError.exit_code
#: Apache Pulsar's default maxMessageSize: `publish @PATH` refuses a larger file before reading it.
_PAYLOAD_MAX = 5 * 1024 * 1024
#: The settings `--help` lists; .env.example has them all.
_MAIN_SETTINGS = (
    "url", "token", "tenant", "namespace", "embedded", "data_dir", "log_level", "log_format", "metrics_port",
    "metrics_host", "shutdown_drain_timeout",
)


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


def parser(prog: str = "eventbus") -> argparse.ArgumentParser:
    """The command line, as `eventbus` parses it (the docs' reference of the commands is made from it)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Event bus on Apache Pulsar.", epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        help="serve /metrics, /livez and /readyz on PORT (as EVENTBUS_METRICS_PORT); with --workers, "
        "worker i serves on PORT+i",
    )
    run.add_argument(
        "--workers", type=_positive, default=1, metavar="N",
        help="run N worker processes of the app (started fresh, restarted when one dies, drained together)",
    )
    run.add_argument("--reload", action="store_true", help="restart the worker when a .py file here changes (development)")
    run.add_argument("--supervised-by", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--worker-number", type=int, default=None, help=argparse.SUPPRESS)
    _docs_parser(commands)
    _dlq_parser(commands)
    _status_and_publish_parsers(commands)
    return parser


def _docs_parser(commands: Any) -> None:
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


def _dlq_parser(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq", help="show or replay a group's dead letters", epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    show = dlq_commands.add_parser(
        "show", help="list a group's dead letters without consuming them",
        description="List the dead letters of GROUP on TOPIC, oldest first, with a reader (no subscription moves).",
    )
    show.add_argument("topic")
    show.add_argument("group")
    show.add_argument("--limit", type=_positive, default=None, metavar="N", help="at most N")
    show.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    show.add_argument("--all", action="store_true", help="every dead letter stored, the replayed ones marked")
    replay_command = dlq_commands.add_parser(
        "replay", help="send a group's dead letters back to that group only",
        description="Send the dead letters of GROUP on TOPIC back to GROUP alone (its retry topic, which the "
        "group's subscription consumes beside TOPIC), up to the last one there when the replay begins. Each is "
        "acknowledged on the durable 'eventbus-replay' subscription once its resend is confirmed: run it again "
        "after a crash and it resends the rest. Exits 1 if any resend failed.",
    )
    replay_command.add_argument("topic")
    replay_command.add_argument("group")
    replay_command.add_argument("--error-type", default=None, metavar="TYPE", help="only dead letters whose error type is TYPE")
    replay_command.add_argument("--limit", type=_positive, default=None, metavar="N", help="at most N")
    replay_command.add_argument("--dry-run", action="store_true", help="say what would be replayed; send and acknowledge nothing")


def _command(commands: Any, name: str, summary: str, description: str) -> Any:
    """A command that reads the settings (listed after its help)."""
    return commands.add_parser(
        name, help=summary, description=description, epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _status_and_publish_parsers(commands: Any) -> None:
    status = _command(
        commands, "status", "each subscription's backlog, unacknowledged messages, consumers and dead letters",
        "For each subscription of the app (or the --topic and --group given), what Apache Pulsar's "
        "admin API (EVENTBUS_ADMIN_URL, EVENTBUS_ADMIN_TOKEN) says: backlog, unacknowledged messages, connected "
        "consumers, rates, and the dead-letter topic. The embedded broker has no admin API: it shows the dead "
        "letters and says what it cannot show.",
    )
    status.add_argument("targets", nargs="*", metavar="MODULE[:ATTRIBUTE]")
    status.add_argument("--topic", default=None)
    status.add_argument("--group", default=None)
    schemas = _command(
        commands, "schemas", "check the app's declared models against the broker's schema registry (exit 1: incompatible)",
        "For each topic the app declares a pydantic model for (Router.publisher, a returns_to handler's "
        "return annotation): the schema the bus registers, what Apache Pulsar's registry holds, and whether the "
        "model may follow it under the namespace's compatibility strategy. Exit 1 when one may not: a check for a "
        "deploy pipeline, before the new version publishes.",
    )
    schemas.add_argument("targets", nargs="+", metavar="MODULE[:ATTRIBUTE]")
    publish = commands.add_parser(
        "publish", help="publish one JSON message and print its id", epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("topic")
    publish.add_argument("json", help="the payload as JSON; - reads it from stdin, @PATH from a file")
    publish.add_argument("--key", default=None)
    publish.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


async def _run(bus: EventBus, supervisor: int | None = None) -> None:
    async with bus:
        log.info("worker connected to %s", bus.url)
        if supervisor is not None:
            threading.Thread(target=_stop_when_orphaned, args=(bus, supervisor), daemon=True).start()
        await bus.run()
    log.info("worker stopped")


def _stop_when_orphaned(bus: EventBus, supervisor: int) -> None:
    """A supervised worker stops gracefully once its supervisor is gone (killed, say)."""
    while os.getppid() == supervisor:
        time.sleep(0.5)
    log.warning("the supervisor (pid %d) is gone: stopping", supervisor)
    bus.stop()


def _payload_text(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    if arg.startswith("@"):
        path = Path(arg[1:])
        try:
            if path.exists() and not path.is_file():  # a device or a pipe (@/dev/zero never ended)
                raise _Fail(f"cannot read the payload from {path}: not a regular file; give a file's path", EXIT_USAGE)
            if path.stat().st_size > _PAYLOAD_MAX:
                raise _Fail(
                    f"the payload in {path} is {path.stat().st_size:,} bytes, over Apache Pulsar's default message "
                    f"limit of {_PAYLOAD_MAX:,}: send a smaller one", EXIT_USAGE,
                )
            return path.read_text()
        except OSError as exc:
            raise _Fail(f"cannot read the payload from {path}: {exc.strerror}", EXIT_USAGE) from None
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


def _key_text(key: str | bytes | None) -> str:
    return repr(key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key) if key else "-"


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    if args.dlq_command == "show":
        found = await replay.show(settings, args.topic, args.group, args.limit, every=args.all)
        if args.json:
            print(orjson.dumps([d.as_json() for d in found], option=orjson.OPT_INDENT_2).decode())
            return 0
        for d in found:
            when = d.publish_time.strftime("%Y-%m-%d %H:%M:%S") if d.publish_time else "?"
            print(printable(
                f"{when}  {d.message_id}{'  (replayed)' if d.replayed else ''}  key={_key_text(d.key)}  {d.reason}  "
                f"{d.error_type}: {d.error}  attempts={d.attempts}  from {d.original_message_id}  {d.preview()}"
            ))
        dead_letter_topic, _ = replay.topics(settings, args.topic, args.group)
        replayed = sum(d.replayed for d in found)
        which = f"stored, {replayed} of them replayed" if args.all else "not replayed (--all: every one)"
        limited = args.limit is not None and len(found) == args.limit
        shown = f"the first {len(found)} (--limit {args.limit}; more may wait)" if limited else str(len(found))
        print(f"{shown} dead letter(s) {which} on {dead_letter_topic}", file=sys.stderr)
        return 0

    def said(dead: replay.DeadLetter, new_id: str | None) -> None:
        done = f"replayed {dead.message_id} -> {new_id}" if new_id is not None else f"would replay {dead.message_id} (dry run)"
        request = "  (a request: sent without its reply address; its requester was told it failed)" if dead.request else ""
        print(printable(f"{done}  key={_key_text(dead.key)}  {dead.error_type}: {dead.error}{request}"), flush=True)

    report = await replay.replay(
        settings, args.topic, args.group, error_type=args.error_type, limit=args.limit, dry_run=args.dry_run,
        progress=said,
    )
    for dead, error in report.failed:
        print(printable(f"failed {dead.message_id}: {error} (left in the dead-letter topic)"), file=sys.stderr)
    already = f"; {report.already} found on the retry topic already (acknowledged)" if report.already else ""
    if report.foreign:
        print(
            f"left {report.foreign} dead letter(s) not written by eventbus on {report.dead_letter_topic} (no "
            "eventbus-dlq-reason; Java's DeadLetterPolicy writes REAL_TOPIC): replay them with the client that "
            "wrote them", file=sys.stderr,
        )
    if report.untrusted:
        print(
            f"warning: {report.untrusted} message(s) on {report.retry_topic} named a dead letter they are not a "
            "copy of: ignored (someone who may produce on this namespace wrote them)", file=sys.stderr,
        )
    print(
        f"{'would replay' if args.dry_run else 'replayed'} {len(report.replayed)} dead letter(s) of group "
        f"{args.group!r} to {report.retry_topic}; {report.skipped} skipped by --error-type; "
        f"{len(report.failed)} failed{already}",
        file=sys.stderr,
    )
    return EXIT_RUNTIME if report.failed else 0


def _schemas(settings: Settings, args: argparse.Namespace) -> int:
    routers, _ = resolve(args.targets)
    declared = declared_schemas(routers, settings.topic)
    if not declared:
        print("no topic has a declared pydantic model: nothing is registered", file=sys.stderr)
        return 0
    if settings.uses_embedded:
        for topic, schema in declared.items():
            print(f"{topic}  {schema.name}  {schema.kind}")
        print("the embedded broker keeps no schemas: set EVENTBUS_URL to check against Apache Pulsar", file=sys.stderr)
        return 0
    api = Admin(settings)
    try:
        checks = [api.schema_check(topic, schema) for topic, schema in declared.items()]
    finally:
        api.close()
    width = max(len(c.topic) for c in checks)
    for c in checks:
        verdict = "same" if c.same else "compatible" if c.compatible else f"INCOMPATIBLE ({c.strategy})"
        print(f"{c.topic:<{width}}  {c.model}  registered: {c.registered}  {verdict}")
    bad = [c for c in checks if not c.compatible]
    if bad:
        print(
            f"{len(bad)} model(s) the registry would refuse under its compatibility strategy: publishing them fails; "
            "keep the change compatible (new fields optional, with defaults) or change the namespace's strategy",
            file=sys.stderr,
        )
    return EXIT_RUNTIME if bad else 0


def _status(settings: Settings, args: argparse.Namespace) -> None:
    if (args.topic is None) != (args.group is None):
        raise _Fail("--topic and --group go together: name both, or the app's modules", EXIT_USAGE)
    declared: dict[tuple[str, str], str] = {}
    if args.topic is not None:
        pairs = [(settings.topic(args.topic), args.group)]
    else:
        routers, _ = resolve(args.targets)
        subs = [sub for router in routers for sub in router.subscriptions]
        pairs = [(settings.topic(sub.topic), sub.group) for sub in subs]
        declared = {(settings.topic(sub.topic), sub.group): sub.subscription_type for sub in subs}
    if settings.uses_embedded:
        _status_embedded(settings, pairs)
        return
    api = Admin(settings)
    try:
        rows = [api.status(topic, group) for topic, group in pairs]
    finally:
        api.close()
    table = [["topic", "group", "type", "backlog", "unacked", "consumers", "in/s", "out/s", "owner", "dead letters"]]
    for r in rows:
        dead = "none" if not r.dead_letter_bytes else f"{r.dead_letter_bytes} B" + (
            f", {r.dead_letters_not_replayed} not replayed" if r.dead_letters_not_replayed is not None else ", none replayed"
        )
        table.append([
            r.topic, r.group, _held(r.subscription_type, declared.get((r.topic, r.group))), str(r.backlog), str(r.unacked),
            str(r.consumers),
            f"{r.rate_in:.1f}", f"{r.rate_out:.1f}", _owner(r.owners), dead,
        ])
    for line in _aligned(table, right={3, 4, 5, 6, 7}):
        print(printable(line))


#: The type Apache Pulsar shows for a subscription the app declares so (failover runs as exclusive there).
_HELD_AS = {"key_shared": "Key_Shared", "shared": "Shared", "failover": "Exclusive", "exclusive": "Exclusive"}


def _held(held: str, declared: str | None) -> str:
    """The type the broker holds the subscription with, flagged when the app's handler asks for another."""
    if declared is None or held in ("?", "") or _HELD_AS.get(declared) == held:
        return held
    return f"{held} (app: {declared}: it cannot join)"


def _aligned(table: list[list[str]], right: Collection[int] = ()) -> list[str]:
    """The rows with each column as wide as its widest cell (numbers to the right), the last one unpadded."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        " ".join(cell.rjust(w) if i in right else (cell if i == len(row) - 1 else cell.ljust(w))
                 for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    ]


def _owner(owners: list[str]) -> str:
    """The owning broker's host:port, or how many brokers own a partitioned topic's partitions."""
    if len(owners) == 1:
        return owners[0].split("://", 1)[-1]
    return f"{len(owners)} brokers"


def _status_embedded(settings: Settings, pairs: list[tuple[str, str]]) -> None:
    known = namespace_topics(settings)
    if known is not None:
        for topic, _ in pairs:
            if topic not in known:  # a group that never dead-lettered is fine; a topic that is not there is not
                check_dead_letters(settings, topic, "", known)
    print("the embedded broker has no admin API: backlog, unacknowledged messages, consumers and rates are "
          "unknown here (Apache Pulsar shows them); dead letters are counted by reading them", file=sys.stderr)
    # Only dead-letter topics that exist are read: reading one makes it.
    dead = [(t, g) for t, g in pairs if known is None or replay.topics(settings, t, g)[0] in known]
    counts = dict(zip(dead, map(len, asyncio.run(replay.show_many(settings, dead))))) if dead else {}
    table = [["topic", "group", "dead letters"], *([t, g, str(counts.get((t, g), 0))] for t, g in pairs)]
    for line in _aligned(table):
        print(printable(line))


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
    deadline = settings.send_deadline_seconds
    bus = EventBus(settings, routers=[])
    await bus.start()
    try:
        with anyio.fail_after(deadline):
            message_id = await bus.publish(args.topic, payload, key=args.key, properties=properties or None)
    except TimeoutError:
        raise EventBusError(
            f"the broker did not confirm the publish to {settings.topic(args.topic)} within {deadline:g} s "
            "(EVENTBUS_SEND_DEADLINE_SECONDS): is the message larger than the topic's maxMessageSize? It may or may not be stored"
        ) from None
    finally:
        with anyio.move_on_after(min(deadline, _CLOSE_WAIT)):  # a send the broker never answers keeps its producer open
            await bus.close()
    print(id_text(message_id))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog or Path(sys.argv[0]).name).parse_args(argv)
    try:
        settings = Settings()
        setup_logging(settings.log_level, settings.log_format, getattr(args, "worker_number", None))
        if args.command != "run" and settings.log_level != "DEBUG":
            # A one-shot command's failure is our one line; the C++ client's ERROR line about it is noise.
            settings = settings.model_copy(update={"log_level": "CRITICAL"})
        if args.command == "run":
            if args.metrics_port is not None:
                settings = settings.model_copy(update={"metrics_port": args.metrics_port})
            if args.workers > 1 or args.reload:
                if args.reload and importlib.util.find_spec("watchfiles") is None:
                    raise _Fail("--reload needs watchfiles: pip install 'eventbus[reload]'", EXIT_USAGE)
                supervisor = Supervisor(
                    args.targets, args.workers, metrics_port=settings.metrics_port, reload=args.reload,
                    drain_timeout=settings.shutdown_drain_timeout + settings.shutdown_exit_timeout,
                )
                return asyncio.run(supervisor.run())
            asyncio.run(_run(load(args.targets, settings), args.supervised_by))
        elif args.command == "docs":
            _docs(settings, args)
        elif args.command == "status":
            _status(settings, args)
        elif args.command == "schemas":
            return _schemas(settings, args)
        elif args.command == "dlq":
            # A wrong topic or group is named before anything is made: a replay would create topics and a subscription.
            check_dead_letters(settings, args.topic, args.group, namespace_topics(settings))
            return asyncio.run(_dlq(settings, args))
        else:
            asyncio.run(_publish(settings, args))
    except _Fail as exc:
        print(printable(f"error: {exc}"), file=sys.stderr)
        return exc.code
    except EventBusError as exc:
        if exc.details:
            sys.stderr.write(exc.details)  # the user's traceback, then our line last
        print(printable(f"error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a topic name the settings cannot resolve
        print(printable(f"error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        print(printable(f"error: {type(exc).__name__}: {exc}"), file=sys.stderr)
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
