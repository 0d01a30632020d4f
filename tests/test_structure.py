"""The package keeps its shape: a one-way stack of modules, strict types, tests on public surfaces."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import eventbus

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_imports_form_a_one_way_stack_and_only_the_adapter_imports_pulsar_client() -> None:
    result = _run(str(Path(sys.executable).with_name("lint-imports")), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(_contracts())} kept, 0 broken" in result.stdout


def test_the_package_type_checks_strictly() -> None:
    result = _run(sys.executable, "-m", "mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert (ROOT / "eventbus" / "py.typed").exists(), "without py.typed, users' type checkers ignore our hints"


def test_tests_use_public_surfaces_only() -> None:
    offences = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import) and any(a.name == "_pulsar" for a in node.names):
                offences.append(f"{where} imports _pulsar")
            elif isinstance(node, ast.ImportFrom) and node.module == "_pulsar":
                offences.append(f"{where} imports _pulsar")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eventbus"):
                offences += [f"{where} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in {"bus", "first", "second", "runner", "producer", "consumer"}
            ):
                offences.append(f"{where} reads {node.value.id}.{node.attr}")
    assert offences == []


def test_the_public_api_is_exported_and_typed(tmp_path: Path) -> None:
    for name in eventbus.__all__:
        assert hasattr(eventbus, name), name
    # `subscribe` keeps the decorated function's type: mypy sees a coroutine function, not Callable[..., Any].
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from eventbus import subscribe\n"
        "@subscribe('orders', 'billing', concurrency=2)\n"
        "async def charge(order: dict[str, int]) -> int: return 1\n"
        "reveal_type(charge)\n"
        "subscribe('orders', 'x', concurency=2)\n"
    )
    result = _run(sys.executable, "-m", "mypy", "--no-incremental", "--strict", str(probe))
    assert "def (order: dict[str, int]) -> typing.Coroutine[Any, Any, int]" in result.stdout, result.stdout
    assert 'Unexpected keyword argument "concurency"' in result.stdout, result.stdout


def test_no_class_over_250_lines_and_no_function_over_60() -> None:
    rooms = []
    for path in sorted((ROOT / "eventbus").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                limit = 250 if isinstance(node, ast.ClassDef) else 60
                if size > limit:
                    rooms.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} is {size} lines (at most {limit})")
    assert rooms == []


def _contracts() -> list[dict[str, Any]]:
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])


def _modules() -> set[str]:
    return {
        ".".join(("eventbus", *path.relative_to(ROOT / "eventbus").with_suffix("").parts))
        for path in (ROOT / "eventbus").rglob("*.py")
        if path.stem not in ("__init__", "__main__")
    }


def _names(layer: str) -> set[str]:
    return {name.strip() for name in layer.replace(":", "|").split("|")}


def test_every_module_is_in_the_stack_and_kept_from_pulsar_client() -> None:
    contracts = _contracts()
    packages = {name for layer in contracts[0]["layers"] for name in _names(layer)}
    forbidden = set(contracts[1]["source_modules"])
    inside: set[str] = set()
    for contract in contracts[2:]:
        for container in contract.get("containers", []):
            inside |= {f"{container}.{name}" for layer in contract["layers"] for name in _names(layer)}
        inside |= set(contract.get("modules", []))
    for module in _modules():
        top = ".".join(module.split(".")[:2])
        assert top in packages, f"{module}: add {top} to the stack of packages in pyproject.toml"
        if module != top:
            assert module in inside, f"{module}: add it to its package's contract in pyproject.toml"
        if module != "eventbus.broker.client":
            assert module in forbidden or top in forbidden, f"{module}: add it to the pulsar-client contract"


def test_the_tree_reads_as_the_architecture() -> None:
    # A newcomer listing the package sees its public face and a folder per concern (docs/explanation/architecture.md).
    top = sorted(path.stem for path in (ROOT / "eventbus").glob("*.py"))
    assert len(top) <= 16, top
    folders = sorted(path.parent.name for path in (ROOT / "eventbus").glob("*/__init__.py"))
    assert folders == ["broker", "consuming", "observing", "operating", "publishing", "running", "service", "testing"]
    # No two modules a newcomer confuses: none shares its first six letters with another (handler/handling,
    # deadletters/dead_lettering did), and no abbreviation of another's name.
    stems = [name.split(".")[-1].replace("_", "") for name in _modules()]
    clashes = {(a, b) for a in stems for b in stems if a < b and a[:6] == b[:6]}
    assert clashes == set()
    assert "dlq" not in stems


def test_the_adapter_seam_is_typed(tmp_path: Path) -> None:
    # The client ships no types: without the Protocols in eventbus/broker/client.py mypy sees Any in what
    # handling, the consumer and the public Message read of a message.
    probe = tmp_path / "seam.py"
    probe.write_text(
        "from eventbus import Message, MessageId\n"
        "from eventbus.broker.client import RawMessage, properties_of\n"
        "def f(m: Message, raw: RawMessage, i: MessageId) -> None:\n"
        "    reveal_type(m.message_id)\n"
        "    reveal_type(raw.message_id())\n"
        "    reveal_type(raw.data())\n"
        "    reveal_type(properties_of(raw))\n"
        "    reveal_type(i.ledger_id())\n"
    )
    result = _run(sys.executable, "-m", "mypy", "--no-incremental", "--strict", str(probe))
    revealed = [line.split("Revealed type is ")[1] for line in result.stdout.splitlines() if "Revealed type" in line]
    assert revealed == [
        '"eventbus.broker.client.MessageId"', '"eventbus.broker.client.MessageId"', '"bytes"', '"dict[str, str] | None"', '"int"',
    ], result.stdout


def test_the_public_names_stay() -> None:
    # Moving modules around must not move anything users import, run or load: these lists change only
    # on purpose, with a CHANGELOG line.
    from importlib.metadata import entry_points

    import eventbus.testing

    assert sorted(eventbus.__all__) == [
        "AuthenticationFailed", "Batch", "BatchFailed", "BatchOptions", "BrokerUnavailable", "CallNext", "ConfigError",
        "DecodeError", "Depends", "EventBus", "EventBusError", "Message", "MessageId", "Middleware", "MiddlewareError",
        "Outgoing",
        "Publication", "PublishBatchError", "PublishError", "PublishNext", "PublishOptions", "Publisher", "Refuse", "Reject",
        "RequestFailed", "RequestTimeout", "Router", "RunningSubscription", "Settings", "StartupFailed",
        "SubscribeOptions", "Subscription", "SubscriptionFailed", "SubscriptionType", "UnawaitedPublish",
        "default_router", "publisher", "subscribe",
    ]
    assert sorted(eventbus.testing.__all__) == [
        "CallResult", "DeadLettered", "Handled", "Harness", "Published", "Recorder", "RecordingPublisher",
        "call_handler", "find_subscription",
    ]
    usage = _run(sys.executable, "-m", "eventbus", "--help").stdout
    assert "{run,docs,dlq,status,schemas,publish}" in usage, usage
    script = entry_points(group="console_scripts", name="eventbus")
    plugin = entry_points(group="pytest11", name="eventbus")
    assert [e.value for e in script] == ["eventbus.cli:entry"] and callable(next(iter(script)).load())
    assert [e.value for e in plugin] == ["eventbus.testing.plugin"] and next(iter(plugin)).load()
