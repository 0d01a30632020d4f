"""The embedded broker's files, tried as another local user would: a planted broker.json moves nothing, and the
data directory is its user's alone."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .test_worker_process import cli


def test_a_planted_broker_json_signals_no_process_and_sends_nothing_to_its_address(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "broker"
    data.mkdir()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def accept() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(5)
            try:
                received.append(connection.recv(65536))
            except OSError:
                pass

    catcher = threading.Thread(target=accept, daemon=True)
    catcher.start()
    (data / "broker.json").write_text(json.dumps({"pid": victim.pid, "port": port, "url": f"pulsar://127.0.0.1:{port}"}))
    env = {**base_env, "EVENTBUS_DATA_DIR": str(data), "EVENTBUS_TOKEN": "s3cret-token"}
    try:
        published = cli(env, "publish", "orders", '{"id": 1}', timeout=90)
        assert published.returncode == 0, published.stderr
        assert victim.poll() is None, "the process named in the planted file was signalled"
    finally:
        victim.kill()
        victim.wait()
        listener.close()
        catcher.join(timeout=10)
    assert not any(b"s3cret-token" in chunk for chunk in received), "the token went to the planted address"
    assert received == [], "nothing was sent to the planted address"
    state = json.loads((data / "broker.json").read_text()) if (data / "broker.json").exists() else {}
    assert state.get("pid") != victim.pid
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_another_user_cannot_read_the_data_directory(base_env: dict[str, str], tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("trying as another uid needs root to switch to it")
    data = tmp_path / "broker"
    env = {**base_env, "EVENTBUS_DATA_DIR": str(data)}
    published = cli(env, "publish", "orders", '{"secret": "payload"}', timeout=90)
    assert published.returncode == 0, published.stderr
    tmp_path.chmod(0o755)  # the parent is open: only the data directory's own mode keeps them out
    other = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.setgid(65534); os.setuid(65534); print(os.listdir(sys.argv[1]))",
         str(data)],
        capture_output=True, text=True, timeout=30,
    )
    assert other.returncode != 0 and "PermissionError" in other.stderr, other.stdout + other.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir() if p.is_file()}
    assert modes and all(mode & 0o077 == 0 for mode in modes.values()), modes
