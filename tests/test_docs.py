"""The docs site and the README: built strictly, shown in a real browser, and every block run as a reader would."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .docs_pages import Command, Page, parse, unmatched

pytestmark = pytest.mark.slow

PAGES = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
CHROMIUM = Path("/usr/bin/chromium")
#: Output a reader's command waits for at most (a worker's start on a busy machine is a few seconds).
WAIT = 60.0


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `mkdocs build --strict` makes it: any warning (a broken link, a reference not found) fails."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_site_builds_strictly_with_every_setting_command_metric_and_exit_code(site: Path) -> None:
    from eventbus.errors import EventBusError
    from eventbus.settings import Settings

    settings = (site / "reference/settings/index.html").read_text()
    assert all(f"EVENTBUS_{name.upper()}" in settings for name in Settings.model_fields)
    cli = (site / "reference/cli/index.html").read_text()
    assert all(f"eventbus {c}" in cli for c in ("run", "docs", "dlq show", "dlq replay", "status", "schemas", "publish"))
    metrics = (site / "reference/metrics/index.html").read_text()
    assert "eventbus_messages_received_total" in metrics and "eventbus_mixed_key_batches_total" in metrics
    codes = (site / "reference/exit-codes/index.html").read_text()
    assert all(cls.__name__ in codes for cls in EventBusError.__subclasses__())
    api = (site / "reference/python-api/index.html").read_text()
    assert 'id="eventbus.EventBus.publish"' in api and 'id="eventbus.testing.Harness"' in api


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_the_site_in_a_real_browser_shows_its_pages_without_errors_and_search_finds_depends(served: str) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            # A closed network: Chromium's own background connections are refused, so they are turned off.
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"{page.url}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
            page.goto(f"{served}/")
            assert "eventbus" in page.title()
            page.goto(f"{served}/tutorial/first-handler/")
            assert page.locator("h1").first.inner_text().startswith("1. First handler")
            page.goto(f"{served}/reference/python-api/")
            assert page.locator("[id='eventbus.EventBus']").count() == 1
            page.goto(f"{served}/explanation/architecture/")
            # Drawn by the site's own mermaid.min.js, into a closed shadow root: the diagram's box has a height.
            page.wait_for_function(
                "() => [...document.querySelectorAll('div.mermaid')].every(d => d.getBoundingClientRect().height > 100)"
                " && document.querySelectorAll('div.mermaid').length == 2",
                timeout=15_000,
            )
            page.goto(f"{served}/")
            page.locator("label.md-search__icon, .md-search__input").first.click()
            page.locator(".md-search__input").fill("Depends")
            found = page.locator(".md-search-result__item")
            found.first.wait_for(timeout=15_000)
            assert found.count() >= 1 and "Depends" in found.first.inner_text()
        finally:
            browser.close()
    assert errors == []


def test_the_benchmark_charts_are_drawn_from_the_checked_in_results(tmp_path: Path) -> None:
    from bench import plot

    results = plot.load([str(ROOT / "docs/bench/embedded.json"), str(ROOT / "docs/bench/pulsar.json")])
    for drawn in plot.plot(results, tmp_path):
        shown = ROOT / "docs/images" / drawn.name
        assert texts(drawn) == texts(shown), f"{shown} is not what the results draw: python -m bench --plot docs/images ..."
        assert any(t.startswith("bus") for t in texts(shown)) and any(t.startswith("raw client") for t in texts(shown))


def texts(svg: Path) -> list[str]:
    """The words of a chart (its labels, title and tick values), in order."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg.read_text())


def test_the_readme_is_short_and_carries_both_quick_start_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert readme.count("\n") <= 250
    run = ".venv/bin/python -m eventbus run handlers handlers.demo"
    test = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest"
    assert run in readme and run in ci  # .ci/run runs the worker as the README says, then the test command
    assert test in readme and test in ci


@pytest.mark.parametrize("name", PAGES)
def test_every_page_runs_as_written(name: str, tmp_path: Path) -> None:
    page = parse((ROOT / name).read_text(), ROOT)
    for shown in page.shown:
        checked = subprocess.run(["bash", "-n"], input=shown, capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: not valid shell:\n{shown}{checked.stderr}"
        for command in eventbus_commands(shown):
            assert parses(command), f"{name}: the command line refuses `{shlex.join(command)}`"
    for data in page.data:
        list(yaml.safe_load_all(data))  # raises on a block that does not parse
    if not page.files and not page.steps:
        return
    for file, text in page.files.items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(text)
    Reader(tmp_path, name).follow(page)


def eventbus_commands(shell: str) -> list[list[str]]:
    """The arguments of each `eventbus ...` or `python -m eventbus ...` in a shown shell block."""
    found = []
    for line in shell.replace("\\\n", " ").split("\n"):
        for part in re.split(r"&&|;|\|", line):
            words = shlex.split(part, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)  # VAR=value before the command
            if words and Path(words[0]).name == "eventbus":
                found.append(words[1:])
            elif len(words) > 2 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "eventbus"]:
                found.append(words[3:])
    return found


def parses(arguments: list[str]) -> bool:
    from eventbus.cli import parser

    try:
        parser("eventbus").parse_args(arguments)
    except SystemExit as exit:
        return exit.code == 0
    return True


class Reader:
    """Follows one page in a fresh directory, as a new user would: its files, snippets and console commands."""

    def __init__(self, where: Path, name: str) -> None:
        self.where, self.name = where, name
        venv = Path(sys.executable).parent
        self.env = {
            "PATH": f"{venv}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", str(where)), "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1", "COLUMNS": "100",
        }
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []

    def follow(self, page: Page) -> None:
        modules = [Path(f).stem for f in page.files if f.endswith(".py") and "/" not in f]
        if modules:
            imports = "; ".join(f"import {m}" for m in modules)
            done = subprocess.run(
                [sys.executable, "-c", imports], cwd=self.where, env=self.env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, f"{self.name}: the page's files do not import:\n{done.stderr}"
        try:
            for n, (kind, step) in enumerate(page.steps):
                if kind == "snippet":
                    self.snippet(n, str(step))
                elif kind == "command":
                    assert isinstance(step, Command)
                    self.command(step)
                else:
                    assert self.background, f"{self.name}: output shown before any command runs in the background"
                    self.await_lines(*self.background[-1], list(step))  # type: ignore[arg-type]
        finally:
            self.stop()

    def snippet(self, n: int, code: str) -> None:
        path = self.where / f"_snippet_{n}.py"
        path.write_text(code)
        done = subprocess.run([sys.executable, path.name], cwd=self.where, env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{self.name}: a snippet failed:\n{code}\n{done.stdout}{done.stderr}"

    def command(self, command: Command) -> None:
        if command.background:
            log = self.where / f"_background_{len(self.background)}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    ["bash", "-c", f"exec {command.shell}"], cwd=self.where, env=self.env, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            self.background.append((process, log))
            self.await_lines(process, log, command.expected)
            return
        expected = [line for line in command.expected if not line.startswith("(exit ")]
        code = next((int(line[6:-1]) for line in command.expected if line.startswith("(exit ")), 0)
        done = subprocess.run(
            ["bash", "-c", command.shell], cwd=self.where, env=self.env, capture_output=True, text=True, timeout=300
        )
        output = done.stdout + done.stderr
        assert done.returncode == code, f"{self.name}: `{command.shell}` exited {done.returncode}:\n{output}"
        missing = unmatched(expected, output)
        assert not missing, f"{self.name}: `{command.shell}` did not print {missing}:\n{output}"

    def await_lines(self, process: subprocess.Popen[bytes], log: Path, expected: list[str]) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            output = log.read_text(errors="replace")
            missing = unmatched(expected, output)
            if not missing:
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: the background command never printed {missing}:\n{output}")
            time.sleep(0.05)  # polls a file for a condition, with a deadline

    def stop(self) -> None:
        for process, log in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the page says
        for process, log in self.background:
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise
            assert code == 0, f"{self.name}: Ctrl-C ended a background command with {code}:\n{log.read_text()}"
