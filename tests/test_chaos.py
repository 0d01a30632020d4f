"""The short chaos run (tests/chaos.py) on each broker; `python -m tests.chaos --seconds 600` runs a long one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_short_chaos_run_loses_nothing_and_keeps_key_order(broker_kind: str, request: pytest.FixtureRequest) -> None:
    if broker_kind == "pulsar":
        request.getfixturevalue("pulsar")  # started once per session, or skipped with the reason
    result = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--seconds", "45", "--broker", broker_kind, "--seed", "11",
         "--drain-timeout", "120"],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "lost                                  0" in result.stdout
    assert "after sigterm                       0" in result.stdout


@pytest.mark.timeout(300)
def test_a_rolling_deploy_under_load_handles_every_message_exactly_once(
    broker_kind: str, request: pytest.FixtureRequest
) -> None:
    if broker_kind == "pulsar":
        request.getfixturevalue("pulsar")
    result = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--seconds", "30", "--broker", broker_kind, "--seed", "5",
         "--schedule", "rolling", "--fault-interval", "2", "4", "--drain-timeout", "120"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "duplicates (extra handlings)          0" in result.stdout
    assert "faults: sigterm" in result.stdout, "the deploy replaced workers"


@pytest.mark.timeout(300)
def test_a_service_built_worker_loses_nothing_under_chaos(broker_kind: str, request: pytest.FixtureRequest) -> None:
    """`--app`: a lifespan holds the records, a middleware writes them, a second group handles in batches, and the
    first asks a third of the same workers with `bus.request` (a reply naming another request fails the run). On
    Apache Pulsar with `--once` too: the first group's two outputs per message, effectively once on `public/dedup`
    (one missing, stored twice, or out of its key's order fails the run)."""
    once = ["--once", "--keys", "64"] if broker_kind == "pulsar" else []
    if broker_kind == "pulsar":
        request.getfixturevalue("pulsar")
    result = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--seconds", "30", "--broker", broker_kind, "--seed", "3", "--app",
         "--drain-timeout", "120", *once],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "batch group: handled (distinct)" in result.stdout
    assert "dead-lettered though handleable       0" in result.stdout
    assert "requests asked" in result.stdout, "the handlers asked the answering group"
    assert "replies naming another request      0" in result.stdout
    if once:
        tail = result.stdout[result.stdout.index("outputs stored (distinct)"):]
        rows = dict(re.findall(r"^\s*(outputs stored \(distinct\)|missing|stored twice|order violations)\s+(\d+)$", tail, re.M))
        assert int(rows["outputs stored (distinct)"]) > 0 and rows["missing"] == rows["stored twice"] == "0", rows
