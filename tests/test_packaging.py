"""The release as a user installs it: the sdist and the wheel built and checked, the wheel run alone in a fresh venv."""

from __future__ import annotations

import email
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import eventbus

from .conftest import ROOT, page_project

pytestmark = pytest.mark.slow

# What a user's shell has: no checkout on the path, no venv of ours active.
_CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "EVENTBUS_"))}

_TINY_APP = '''
from eventbus import subscribe


@subscribe("orders", "billing")
async def charge(order: dict) -> None:
    print(f"charged {order['id']}", flush=True)
'''


@dataclass
class Built:
    sdist: Path
    wheel: Path  # built from the sdist, as an installer building from source would
    direct: Path  # built from the tree
    output: str  # what both builds printed


def _run(*command: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=_CLEAN_ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _checkout_files() -> list[str]:
    """The files a clean clone has (tracked, plus new ones not ignored): what a release is built from."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    source = tmp_path_factory.mktemp("source")
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    direct = tmp_path_factory.mktemp("direct")
    # No flags: the sdist first, then the wheel from the unpacked sdist.
    first = _run(sys.executable, "-m", "build", "--outdir", out, source, cwd=source)
    second = _run(sys.executable, "-m", "build", "--wheel", "--outdir", direct, source, cwd=source)
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    [direct_wheel] = direct.glob("*.whl")
    output = "\n".join((first.stdout, first.stderr, second.stdout, second.stderr))
    return Built(sdist, wheel, direct_wheel, output)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel with its `testing` extra, and nothing of the checkout."""
    home = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", home, cwd=home)
    _run(home / "bin" / "pip", "install", "-q", f"{built.wheel}[testing]", cwd=home)
    return home


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "tiny.py").write_text(_TINY_APP)
    return tmp_path


def _package_files() -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for path in (ROOT / "eventbus").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _wheel_files(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: hashlib.sha256(archive.read(name)).hexdigest() for name in archive.namelist()}


def test_the_builds_print_no_warning_and_twine_accepts_them(built: Built) -> None:
    warnings = [line for line in built.output.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]
    assert warnings == [], "\n".join(warnings)
    checked = _run(sys.executable, "-m", "twine", "check", "--strict", built.sdist, built.wheel, built.direct, cwd=ROOT)
    assert checked.stdout.count("PASSED") == 3, checked.stdout


def test_the_wheel_holds_every_module_and_the_sdist_builds_the_same_wheel(built: Built) -> None:
    files = _wheel_files(built.wheel)
    dist_info = f"eventbus-{eventbus.__version__}.dist-info"
    assert {n for n in files if not n.startswith(dist_info)} == _package_files(), "the wheel's package is the tree's"
    assert f"{dist_info}/licenses/LICENSE" in files
    assert {n: h for n, h in files.items() if not n.endswith("RECORD")} == {
        n: h for n, h in _wheel_files(built.direct).items() if not n.endswith("RECORD")
    }, "the wheel built from the sdist differs from the one built from the tree"
    with tarfile.open(built.sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "CHANGELOG.md", "SECURITY.md", "README.md", "pyproject.toml"} <= names
    assert _package_files() <= names


def test_the_metadata_names_the_license_the_version_and_only_pythons_the_suite_runs_on(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as archive:
        metadata = email.message_from_bytes(archive.read(f"eventbus-{eventbus.__version__}.dist-info/METADATA"))
    assert metadata["Version"] == eventbus.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and metadata.get_all("License-File") == ["LICENSE"]
    assert {url.split(",")[0] for url in metadata.get_all("Project-URL")} == {
        "Homepage", "Documentation", "Changelog", "Issues",
    }
    pythons = {c.rsplit(" :: ", 1)[1] for c in metadata.get_all("Classifier") if c.startswith("Programming Language :: Python :: 3.")}
    assert pythons == {"3.11"}, "name only the Pythons CI runs the suite on"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in pythons
    assert metadata["Requires-Python"] == ">=3.11"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in config and config["dynamic"] == ["version"], "the version is written once: eventbus/__init__.py"


def test_the_installed_wheel_runs_alone_a_worker_publish_docs_and_version(venv: Path, app_dir: Path) -> None:
    bin_dir = venv / "bin"
    where = _run(bin_dir / "python", "-c", "import eventbus; print(eventbus.__file__)", cwd=app_dir).stdout.strip()
    assert where.startswith(str(venv)), f"eventbus came from {where}, not the wheel"
    version = _run(bin_dir / "eventbus", "--version", cwd=app_dir).stdout.strip()
    assert version == f"eventbus {eventbus.__version__}"

    docs = json.loads(_run(bin_dir / "eventbus", "docs", "tiny", cwd=app_dir).stdout)
    addresses = [c["address"] for c in docs["channels"].values()]
    assert sorted(addresses) == [f"persistent://public/default/orders{s}" for s in ("", "-billing-DLQ", "-billing-RETRY")]

    with _worker(bin_dir, app_dir) as lines:
        published = _run(bin_dir / "eventbus", "publish", "orders", '{"id": "o-1"}', "--key", "o-1", cwd=app_dir)
        assert published.stdout.strip().count(":") == 3, published.stdout  # ledger:entry:partition:batch
        assert _line_with("charged o-1", lines, timeout=60) == "charged o-1"


def test_the_tutorials_testing_example_runs_with_the_plugin_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    for name, text in page_project("docs/tutorial/testing.md").items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path, env=_CLEAN_ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


class _Lines:
    """The worker's output, line by line, read by a thread of its own so a wait can have a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self, deadline: float) -> str | None:
        try:
            line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is not None:
            self.seen.append(line)
        return line


def _line_with(text: str, lines: _Lines, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = lines.next(deadline)
        if line is None:
            break
        if text in line:
            return line
    pytest.fail(f"the worker never printed {text!r}; it printed: {lines.seen[-20:]}")


class _worker:
    """`eventbus run tiny` from the venv, stopped with SIGINT at the end (it must exit 0)."""

    def __init__(self, bin_dir: Path, app_dir: Path) -> None:
        self.process = subprocess.Popen(
            [str(bin_dir / "eventbus"), "run", "tiny"],
            cwd=app_dir, env={**_CLEAN_ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )

    def __enter__(self) -> _Lines:
        lines = _Lines(self.process)
        _line_with("subscribed persistent://public/default/orders group=billing", lines, timeout=60)
        return lines

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.process.kill()
        assert code == 0, f"the worker exited {code} on SIGINT"

