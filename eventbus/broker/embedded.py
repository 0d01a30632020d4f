"""The embedded Pulsar-protocol broker (pulsar-lite), shared between processes.

Every process that uses the same data directory reaches the same broker: the
first starts it, the others find its address in ``broker.json``, and the last
to leave stops it. Each user holds a shared lock on ``users.lock`` for as long
as it uses the broker, so "am I the last?" is a non-blocking exclusive lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BrokerUnavailable

START_TIMEOUT = 20.0
#: Seconds a broker whose users all died (SIGKILL: no release) goes on before it stops itself.
IDLE_STOP = 60.0
#: How often the watcher looks for users.
_WATCH_POLL = 0.5


def _binary() -> str:
    from pulsar_lite.binary_finder import find_pulsar_lite_binary

    return str(find_pulsar_lite_binary())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False  # gone meanwhile
    if state != "Z":
        return True
    # Dead, a zombie until its parent reaps it: reap it if it is ours; as good as gone anyway.
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class EmbeddedBroker:
    """A lease on the embedded broker under `data_dir`; `release()` when done."""

    data_dir: Path
    url: str
    pid: int
    _users_fd: int

    @classmethod
    def acquire(cls, data_dir: Path, timeout: float = START_TIMEOUT, idle_stop: float = IDLE_STOP) -> EmbeddedBroker:
        """Join the broker under `data_dir`, or start one.

        A broker started here stops when its last user releases it, or, should every
        user die without releasing (SIGKILL), after `idle_stop` seconds without one.
        """
        data_dir = data_dir.absolute()
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if data_dir.stat().st_uid == os.getuid():
                data_dir.chmod(0o700)  # handled payloads live here: the user's own (it was 0755, files 0644)
        except OSError as exc:
            raise BrokerUnavailable(f"cannot create embedded broker data dir {data_dir}: {exc.strerror}") from None
        with _locked(data_dir / "broker.lock"):
            users_fd = os.open(data_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(users_fd, fcntl.LOCK_SH)
            try:
                state = _read_state(data_dir)
                if state and _alive(state["pid"]) and _accepts(state["port"]):
                    return cls(data_dir, state["url"], state["pid"], users_fd)
                if state and _alive(state["pid"]):  # alive but deaf: a broker we cannot use
                    stop_broker(state["pid"], data_dir)
                url, pid = start_broker(data_dir, timeout)
                _start_watcher(data_dir, pid, idle_stop)
                return cls(data_dir, url, pid, users_fd)
            except BaseException:
                os.close(users_fd)
                raise

    def release(self) -> None:
        """Give up the lease; the last user stops the broker."""
        if self._users_fd < 0:
            return
        with _locked(self.data_dir / "broker.lock"):
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last:
                stop_broker(self.pid, self.data_dir)
                (self.data_dir / "broker.json").unlink(missing_ok=True)
            os.close(self._users_fd)
            self._users_fd = -1

    def lease(self, topic: str, group: str) -> SubscriptionLease:
        """The turn of this process to consume `group` on `topic` (see `SubscriptionLease`)."""
        return SubscriptionLease(self.data_dir, topic, group)


def stored_topics(data_dir: Path, tenant: str, namespace: str) -> list[str] | None:
    """The persistent topics the embedded broker under `data_dir` has in `tenant/namespace` (None: cannot tell).

    Read from pulsar-lite 0.2's metadata file (``db.metadata.json``, written as each topic is made),
    because the embedded broker has no admin API; a layout this does not know answers None.
    """
    try:
        metadata = json.loads((data_dir / "db.metadata.json").read_text())
    except FileNotFoundError:
        return []  # nothing was ever stored
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get("version") != 2:
        return None
    stores = [v for k, v in metadata.items() if k not in ("version", "partitioned_topics") and isinstance(v, dict)]
    found: set[str] = set()
    for store in stores:
        topics = store.get(tenant, {}).get(namespace, {}).get("persistent", {})
        found.update(f"persistent://{tenant}/{namespace}/{name}" for name in topics)
    return sorted(found)


class SubscriptionLease:
    """One process at a time consumes a subscription of the embedded broker.

    pulsar-lite 0.2 tells a subscription's consumers apart by consumer id alone,
    and every client numbers its consumers from 0. A second process's consumer
    is refused until its retries reach another id; then, on a failover
    subscription, it may take the active role while the old consumer still
    holds unacknowledged messages, which are not redelivered: the new one
    handles a key's later messages before the earlier ones. So the processes
    take turns on an exclusive lock: the holder consumes, the others stand by
    and take over when it leaves (the kernel frees the lock even on SIGKILL).
    """

    def __init__(self, data_dir: Path, topic: str, group: str) -> None:
        digest = hashlib.sha256(f"{topic}\0{group}".encode()).hexdigest()[:32]
        self.path = data_dir / "leases" / f"{digest}.lock"
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> bool:
        """Take the lease if no other holder has it; True if this one holds it now."""
        if self._fd >= 0:
            return True
        self.path.parent.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it, for the others' standby line
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid of the process holding the lease (as it wrote it), if one does."""
        try:
            text = self.path.read_text()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _locked:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    """What `start_broker` recorded, if it is that: a pulsar-lite of this user serving this data directory on a
    loopback port. A planted or stale file (a pid reused by another process, a URL naming another host) is not
    trusted: the bus neither signals that process nor sends anything to that address."""
    try:
        state = json.loads((data_dir / "broker.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not {"pid", "port", "url"} <= state.keys():
        return None
    pid, port = state["pid"], state["port"]
    if type(pid) is not int or type(port) is not int or state["url"] != f"pulsar://127.0.0.1:{port}":
        return None
    return state if _is_our_broker(pid, data_dir) else None


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is this user's pulsar-lite serving `data_dir` (a dead one counts: nothing to signal)."""
    try:
        if Path(f"/proc/{pid}").stat().st_uid != os.getuid():
            return False
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return True  # gone: nothing will be signalled
    except OSError:
        return False
    return bool(command) and Path(os.fsdecode(command[0])).name == "pulsar-lite" and (
        os.fsencode(data_dir / "db") in command
    )


def start_broker(data_dir: Path, timeout: float = START_TIMEOUT, port: int | None = None) -> tuple[str, int]:
    """Start a pulsar-lite process on `port` (a free one if None); its URL and pid. `acquire()` shares one."""
    port, data_dir = port or _free_port(), data_dir.absolute()
    log_path = data_dir / "broker.log"
    config = data_dir / "pulsar-lite.toml"
    # Its metrics server wants a fixed port; a second broker on the machine would fail to bind it.
    _private(config, b"[metrics]\nenabled = false\n")
    with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log_file:
        # A session of its own: Ctrl-C in the terminal must reach the worker,
        # which drains, and not the broker it drains to.
        proc = subprocess.Popen(
            [
                _binary(), "--config", str(config), "--addr", f"127.0.0.1:{port}",
                "--db-path", str(data_dir / "db"), "--log-level", "warn",
            ],
            stdout=log_file,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            cwd=data_dir,
            start_new_session=True,
            umask=0o077,  # its entry log holds handled payloads: the user's alone
        )
    deadline = time.monotonic() + timeout
    while not _accepts(port):
        if proc.poll() is not None:
            raise BrokerUnavailable(
                f"embedded broker exited with code {proc.returncode} at start; log {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise BrokerUnavailable(f"embedded broker did not listen within {timeout:.0f}s; log {log_path}")
        time.sleep(0.05)
    url = f"pulsar://127.0.0.1:{port}"
    tmp = data_dir / "broker.json.tmp"
    _private(tmp, json.dumps({"pid": proc.pid, "port": port, "url": url}).encode())
    tmp.replace(data_dir / "broker.json")
    return url, proc.pid


def _private(path: Path, data: bytes) -> None:
    """Write a file only its user may read (mode 0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as file:
        file.write(data)


def restart_broker(data_dir: Path, pid: int, port: int, timeout: float = START_TIMEOUT) -> tuple[str, int]:
    """Stop the broker `pid` and start another on the same port and data; its users reconnect.

    Holds the start lock meanwhile, so a process joining waits for the new broker rather
    than starting one of its own.
    """
    with _locked(data_dir.absolute() / "broker.lock"):
        stop_broker(pid, data_dir.absolute())
        return start_broker(data_dir.absolute(), timeout, port)


def stop_broker(pid: int, data_dir: Path | None = None, timeout: float = 10.0) -> None:
    """Stop a broker process: SIGTERM, then SIGKILL after `timeout` seconds; with `data_dir`, only if `pid` is
    still this user's pulsar-lite of that directory (a recorded pid may have been reused since)."""
    if data_dir is not None and not _is_our_broker(pid, data_dir):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = float("inf")
        time.sleep(0.02)


def _start_watcher(data_dir: Path, pid: int, idle_stop: float) -> None:
    """A process of its own that stops the broker once nobody has used it for `idle_stop` seconds."""
    subprocess.Popen(
        [sys.executable, "-c", "import sys; from eventbus.broker.embedded import watch; watch(*sys.argv[1:])",
         str(data_dir), str(pid), str(idle_stop)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def watch(data_dir: str, pid: str, idle_stop: str) -> None:
    """Stop the broker `pid` once no process has held a lease on it for `idle_stop` seconds; end with it."""
    root, broker, idle = Path(data_dir), int(pid), float(idle_stop)
    idle_since: float | None = None
    while _alive(broker):
        with _locked(root / "broker.lock"):  # acquire() and release() hold it too: no user slips in meanwhile
            fd = os.open(root / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                unused = True
            except BlockingIOError:
                unused = False
            finally:
                os.close(fd)
            now = time.monotonic()
            idle_since = (idle_since or now) if unused else None
            if idle_since is not None and now - idle_since >= idle:
                state = _read_state(root)
                stop_broker(broker, root)
                if state and state.get("pid") == broker:
                    (root / "broker.json").unlink(missing_ok=True)
                return
        time.sleep(_WATCH_POLL)
