"""`eventbus run --workers N` and `--reload`: worker processes started fresh, restarted, drained together."""

from __future__ import annotations

import ast
import os
import signal
import socket
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from eventbus import EventBus, Settings

from .conftest import eventually
from .test_worker_process import Worker, lines

pytestmark = pytest.mark.slow


class Supervised(Worker):
    """`eventbus run --workers N` or `--reload`: the supervisor, whose log names each worker it starts."""

    def pids(self) -> list[int]:
        return [int(line.rsplit("(pid ", 1)[1].rstrip(")")) for line in self.text().splitlines() if " started (pid " in line]

    def kill(self) -> None:
        super().kill()
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_port_pair() -> int:
    """A port P with P and P+1 free now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no two consecutive free ports")


def answers(port: int, path: str = "/livez") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def by_key(record: Path) -> dict[str, list[int]]:
    """`done` lines per key, in the order they were written (the recorder's payload is {"k": key, "n": n})."""
    seen: dict[str, list[int]] = defaultdict(list)
    for line in lines(record):
        kind, _, payload = line.partition(" ")
        if kind == "done":
            value = ast.literal_eval(payload)
            seen[value["k"]].append(value["n"])
    return seen


async def test_two_workers_share_the_keys_restart_when_killed_and_drain_on_sigterm(
    pulsar: dict, settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    if not settings.url:
        pytest.skip("on Apache Pulsar: the embedded broker runs one consumer per subscription")
    record = tmp_path / "record.txt"
    env = {**subprocess_env, "EB_TOPIC": topic, "EB_RECORD": str(record), "EB_SLOW": "0.002"}
    sup = Supervised(env, tmp_path / "sup.log", "tests.apps.recorder", "--workers", "2")
    try:
        await eventually(lambda: sup.text().count("subscribed persistent") >= 4, what="both workers to subscribe")
        first, second = sup.pids()
        async with EventBus(settings, routers=[]) as bus:
            for n in range(200):
                await bus.publish(topic, {"k": f"k{n % 16}", "n": n}, key=f"k{n % 16}")
            await eventually(lambda: sum(map(len, by_key(record).values())) >= 100, what="half of them")
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: len(sup.pids()) == 3, what="the killed worker to be restarted")
            for n in range(200, 400):
                await bus.publish(topic, {"k": f"k{n % 16}", "n": n}, key=f"k{n % 16}")
            await eventually(lambda: {n for ns in by_key(record).values() for n in ns} == set(range(400)), what="all 400")
        assert "worker 0 (pid" in sup.text() and "restarting in" in sup.text()
        handlers = {int(line.split()[0]) for line in record.read_text().splitlines()}
        assert {first, second} <= handlers, "both processes handled messages"
        for key, ns in by_key(record).items():
            # A killed worker's unacknowledged messages come again: order per key holds, repeats allowed.
            firsts = list(dict.fromkeys(ns))
            assert firsts == sorted(firsts), f"{key} out of order: {ns}"

        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.wait_exit() == 0, sup.text()
        assert not any(alive(pid) for pid in sup.pids())
        assert sup.text().count("worker stopped") == 2
    finally:
        sup.kill()


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port_pair()
    # The port as a setting (.env or environment), not --metrics-port (the other tests): worker i serves on PORT+i
    # all the same. Each worker used to take the setting as it was: worker 1 exited 2, address in use.
    env = {**subprocess_env, "EB_TOPIC": topic, "EB_RECORD": str(tmp_path / "record.txt"), "EVENTBUS_METRICS_PORT": str(port)}
    sup = Supervised(env, tmp_path / "sup.log", "tests.apps.recorder", "--workers", "2")
    try:
        await eventually(lambda: len(sup.pids()) == 2 and "subscribed persistent" in sup.text(), what="the workers")
        await eventually(lambda: answers(port) and answers(port + 1), what="both workers' probes")
        workers = sup.pids()
        sup.proc.send_signal(signal.SIGKILL)
        await eventually(lambda: not any(alive(pid) for pid in workers), timeout=30, what="the orphans to stop")
        assert sup.text().count("is gone: stopping") == 2
        assert sup.text().count("worker stopped") == 2
    finally:
        sup.kill()


async def test_a_worker_that_keeps_dying_makes_the_supervisor_give_up(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "crashing.py").write_text("import os\nos._exit(3)\n")
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    crashing = Supervised(env, tmp_path / "crashing.log", "crashing", "--workers", "2", cwd=tmp_path)
    broken = Supervised(env, tmp_path / "broken.log", "broken", "--workers", "2", cwd=tmp_path)
    try:
        assert await broken.wait_exit() == 2, broken.text()
        assert await crashing.wait_exit() == 1, crashing.text()
    finally:
        crashing.kill()
        broken.kill()
    assert "cannot import handler module 'broken'" in broken.text()
    assert "exited 2 (configuration): not restarting" in broken.text()
    assert crashing.text().count("exited 3: restarting in") == 4
    assert "workers died 5 times in 60s: giving up" in crashing.text()


async def test_reload_restarts_the_worker_with_the_edited_handler(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    if settings.url:
        pytest.skip("--reload is for development: the embedded broker")
    record = tmp_path / "record.txt"
    app = tmp_path / "reloaded.py"
    source = (
        "import os\nfrom eventbus import subscribe\n"
        f"@subscribe({topic!r}, 'dev', initial_position='earliest')\n"
        "async def handle(n: int) -> None:\n"
        f"    open({str(record)!r}, 'a').write(f'{{os.getpid()}} VERSION {{n}}\\n')\n"
    )
    app.write_text(source.replace("VERSION", "v1"))
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    sup = Supervised(env, tmp_path / "sup.log", "reloaded", "--reload", cwd=tmp_path)
    try:
        await eventually(lambda: "subscribed persistent" in sup.text(), what="the worker")
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 1)
            await eventually(lambda: "v1 1" in lines(record), what="v1 to handle 1")
            app.write_text(source.replace("VERSION", "v2"))
            await eventually(lambda: "reloaded.py changed" in sup.text(), what="the change to be seen")
            await eventually(lambda: sup.text().count("subscribed persistent") >= 4, what="the new worker")
            await bus.publish(topic, 2)
            await eventually(lambda: "v2 2" in lines(record), what="v2 to handle 2")
        assert lines(record) == ["v1 1", "v2 2"]
        sup.proc.send_signal(signal.SIGINT)
        assert await sup.wait_exit() == 0, sup.text()
    finally:
        sup.kill()


async def test_reload_survives_a_broken_save_and_picks_up_the_fix(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    if settings.url:
        pytest.skip("--reload is for development: the embedded broker")
    record = tmp_path / "record.txt"
    app = tmp_path / "edited.py"
    source = (
        "import os\nfrom eventbus import subscribe\n"
        f"@subscribe({topic!r}, 'dev', initial_position='earliest')\n"
        "async def handle(n: int) -> None:\n"
        f"    open({str(record)!r}, 'a').write(f'{{os.getpid()}} VERSION {{n}}\\n')\n"
    )
    app.write_text(source.replace("VERSION", "v1"))
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    sup = Supervised(env, tmp_path / "sup.log", "edited", "--reload", cwd=tmp_path)
    try:
        await eventually(lambda: "subscribed persistent" in sup.text(), what="the worker")
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 1)
            await eventually(lambda: "v1 1" in lines(record), what="v1 to handle 1")
            app.write_text(source.replace("VERSION", "v2").replace("async def handle", "async def handle(("))
            await eventually(lambda: "waiting for the next change" in sup.text(), what="the broken save to fail")
            await bus.publish(topic, 2)  # nobody consumes it now: it waits for the fixed worker
            app.write_text(source.replace("VERSION", "v3"))
            await eventually(lambda: "v3 2" in lines(record), timeout=30, what="the fix to handle 2")
        assert lines(record) == ["v1 1", "v3 2"]
        assert sup.proc.returncode is None, "the supervisor kept running through the broken save"
        assert sup.text().count("waiting for the next change") == 1, "the error logged once"
        sup.proc.send_signal(signal.SIGINT)
        assert await sup.wait_exit() == 0, sup.text()
    finally:
        sup.kill()


async def test_a_worker_that_cannot_start_is_not_restarted_and_the_others_go_on(
    settings: Settings, topic: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port_pair()
    # Worker 1 (probes on PORT+1) cannot import the app; worker 0 can.
    (tmp_path / "half.py").write_text(
        "import sys\n"
        f"if sys.argv[sys.argv.index('--metrics-port') + 1] == '{port + 1}':\n"
        "    raise KeyError('SHOP_DATABASE_URL')\n"
        "from tests.apps.recorder import *  # noqa\n"
    )
    record = tmp_path / "record.txt"
    env = {**subprocess_env, "EB_TOPIC": topic, "EB_RECORD": str(record),
           "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    sup = Supervised(env, tmp_path / "sup.log", "half", "--workers", "2", "--metrics-port", str(port), cwd=tmp_path)
    try:
        await eventually(lambda: "not restarting; 1 worker(s) still running" in sup.text(), what="worker 1 to fail")
        await eventually(lambda: answers(port), what="worker 0's probes")
        async with EventBus(settings, routers=[]) as bus:
            await bus.publish(topic, 7, key="k")
        await eventually(lambda: "done 7" in lines(record), what="worker 0 to handle it")
        assert sup.proc.returncode is None
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.wait_exit() == 2, sup.text()  # it drained, and says a worker could not start
    finally:
        sup.kill()
    assert sup.text().count("worker stopped") == 1
