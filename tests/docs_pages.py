"""What a docs page asks a reader to run, read from its Markdown: project files, Python snippets, console sessions.

The rules (the docs' own "Writing these docs" section, docs/explanation/architecture.md, says them too):
- a `python`, `toml` or `ini` block whose first line is `# NAME` (a file name) is a file of the page's project,
  written as shown, and every Python file of it is imported;
- any other `python` block is a snippet, run with the project's files beside it: it must exit 0;
- a `console` block is run: `$ COMMAND` lines are run in order, the lines under one are what it must print (in
  that order, other lines between them allowed, `...` standing for any text); a command with the comment
  `# runs until Ctrl-C` runs in the background, its lines are awaited, and it gets SIGINT at the page's end and
  must exit 0; a `console` block with no command is lines the last background command's output must come to
  hold (in that order), awaited; a line `(exit N)` under a command is its exit code (0 unless said);
- a `--8<-- "PATH"` line is the repository's file at PATH, as the site shows it;
- a `bash` block is shown, not run (docker, kubectl, a second machine): it must be valid shell, and each
  `eventbus ...` command in it must be accepted by the command line's parser; a `yaml` block must parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```([a-z]*)[^\n]*\n(.*?)^```", re.M | re.S)
BACKGROUND = "# runs until Ctrl-C"
#: pymdownx.snippets' include line: the site shows the file there, and so does a reader's project.
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', re.M)


@dataclass
class Command:
    """One `$` line of a console block and the lines it must print."""

    line: str
    expected: list[str] = field(default_factory=list)

    @property
    def background(self) -> bool:
        return self.line.rstrip().endswith(BACKGROUND)

    @property
    def shell(self) -> str:
        return self.line.removesuffix(BACKGROUND).rstrip() if self.background else self.line


@dataclass
class Page:
    """A page's blocks, by kind, in page order (steps: snippets, console commands and awaited output)."""

    files: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[str, object]] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)


def parse(markdown: str, root: Path | None = None) -> Page:
    """The page's files, runnable steps and shown-only shell blocks (`--8<-- "PATH"` lines read from `root`)."""
    if root is not None:
        markdown = INCLUDE.sub(lambda m: (root / m.group(1)).read_text().rstrip("\n"), markdown)
    page = Page()
    for match in FENCE.finditer(markdown):
        lang, body = match.group(1), match.group(2)
        first = body.split("\n", 1)[0]
        if lang in ("python", "toml", "ini") and re.fullmatch(r"# [\w/-]*\.[\w.]+", first):
            page.files[first[2:]] = body
        elif lang == "python":
            page.steps.append(("snippet", body))
        elif lang == "console":
            commands = console(body)
            if commands and commands[0].line:
                page.steps += [("command", c) for c in commands]
            elif commands:
                page.steps.append(("more", commands[0].expected))
        elif lang == "bash":
            page.shown.append(body)
        elif lang == "yaml":
            page.data.append(body)
    return page


def console(body: str) -> list[Command]:
    """`$ ` lines and the output under each (a block that starts with output: a Command with no line)."""
    commands: list[Command] = []
    for line in body.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            commands.append(Command(line[2:]))
        elif line.strip():
            if not commands:
                commands.append(Command(""))
            commands[-1].expected.append(line)
    return commands


def pattern(expected: str) -> re.Pattern[str]:
    """An expected line as a pattern: `...` is any text, the rest literal, found anywhere in a line."""
    return re.compile(".*".join(re.escape(part.strip()) for part in expected.split("...")))


def unmatched(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in `output`'s lines in that order (the first missing one and those after it)."""
    lines = output.split("\n")
    at = 0
    for n, wanted in enumerate(expected):
        if wanted.strip() == "...":
            continue
        rx = pattern(wanted)
        while at < len(lines) and not rx.search(lines[at]):
            at += 1
        if at == len(lines):
            return expected[n:]
        at += 1
    return []
