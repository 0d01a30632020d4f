"""MkDocs hook: the reference pages' tables, made from the code at build time (`<!-- generated: NAME -->`)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

_MARK = re.compile(r"<!-- generated: ([a-z-]+) -->")


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each `<!-- generated: NAME -->` with what GENERATORS[NAME] makes; an unknown name fails the build."""
    return _MARK.sub(lambda m: GENERATORS[m.group(1)](), markdown)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """Every setting: its environment variable (and aliases), default and meaning, from `Settings`."""
    from pydantic import AliasChoices

    from eventbus.settings import Settings

    rows = ["| environment variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        names = [f"EVENTBUS_{name.upper()}"]
        if isinstance(field.validation_alias, AliasChoices):
            names += [str(a) for a in field.validation_alias.choices if str(a) not in (name, names[0])]
        default = "empty" if field.default in (None, "") else f"`{field.default}`"
        variable = " or ".join(f"`{n}`" for n in names)
        rows.append(f"| {variable} | {_cell(default)} | {_cell(field.description)} |")
    return "\n".join(rows)


def cli_help() -> str:
    """Each command's `--help`, from the parser `eventbus` runs."""
    from eventbus.cli import parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same text on every machine
    parts: list[str] = []

    def walk(command: argparse.ArgumentParser, path: str) -> None:
        parts.append(f"### `{path}`\n\n```text\n{command.format_help().rstrip()}\n```\n")
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(parser("eventbus"), "eventbus")
    return "\n".join(parts)


def metrics_table() -> str:
    """Every metric the worker serves: name, type, labels and help, from the collector itself."""
    from eventbus.observing.metrics import Metrics

    metrics = Metrics()
    metrics.subscription("orders", "billing")
    metrics.topic("orders")
    rows = ["| metric | type | labels | what |", "|---|---|---|---|"]
    for family in metrics.describe():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in getattr(family, "_labelnames", ()))
        rows.append(f"| `{name}` | {family.type} | {labels} | {_cell(family.documentation)} |")
    return "\n".join(rows)


def exit_codes() -> str:
    """Every error class of the package with the exit code the CLI gives it."""
    from eventbus import errors

    rows = ["| error | exit code | what |", "|---|---|---|"]
    seen: list[type] = []
    pending: list[type] = [errors.EventBusError]
    while pending:
        cls = pending.pop(0)
        seen.append(cls)
        pending += sorted(cls.__subclasses__(), key=lambda c: c.__name__)
    for cls in seen:
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        rows.append(f"| `{cls.__module__}.{cls.__name__}` | {cls.exit_code} | {_cell(doc)} |")
    return "\n".join(rows)


def api() -> str:
    """A reference entry for every public name: `eventbus.__all__`, then `eventbus.testing.__all__`."""
    import eventbus
    import eventbus.testing

    parts = ["## `eventbus`\n"]
    parts += [f"::: eventbus.{name}\n" for name in eventbus.__all__]
    parts += ["## `eventbus.testing`\n"]
    parts += [f"::: eventbus.testing.{name}\n" for name in eventbus.testing.__all__]
    return "\n".join(parts)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "cli": cli_help,
    "metrics": metrics_table,
    "exit-codes": exit_codes,
    "api": api,
}
