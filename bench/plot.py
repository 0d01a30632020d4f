"""Charts of the bench's own results (`--json` files): throughput against the raw client, and latency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: What the charts draw, in order: the bus's rows and the raw client's they are compared with.
THROUGHPUT = (
    ("publish", "raw send_async, fire-and-forget (limit)", "raw client: send_async"),
    ("publish", "bus.publish, 1000 tasks awaiting, each confirmed", "bus.publish, each awaited"),
    ("publish", "bus.publish_batch, 1000 a call", "bus.publish_batch"),
    ("consume", "raw blocking receive+decode+ack (limit)", "raw client: receive+decode+ack"),
    ("consume", "bus worker, pydantic model, no-op handler, concurrency 1", "bus worker, pydantic, concurrency 1"),
    ("consume", "bus worker, pydantic model, no-op handler, concurrency 64", "bus worker, pydantic, concurrency 64"),
)
LATENCY = (
    ("latency", "raw client: publish->receive at 1000 msg/s", "raw client: publish to receive"),
    ("latency", "publish->handler at 1000 msg/s", "bus: publish to handler"),
    ("request", "raw client: two publish->receive hops, 1 in flight", "raw client: two hops"),
    ("request", "bus.request round trips, 1 task", "bus.request, 1 in flight"),
)


def load(paths: list[str]) -> list[dict[str, Any]]:
    """Each results file as `--json` wrote it: {"meta": {"broker": ...}, "rows": [...]}."""
    return [json.loads(Path(p).read_text()) for p in paths]


def _row(results: dict[str, Any], op: str, path: str) -> dict[str, Any] | None:
    return next((r for r in results["rows"] if r["op"] == op and r["path"] == path and r["size"] == 100), None)


def _broker(results: dict[str, Any]) -> str:
    return "embedded broker" if results["meta"]["broker"].startswith("embedded") else "Apache Pulsar"


def plot(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """throughput.svg and latency.svg in `out`, one group of bars per broker; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "eventbus"  # the same results make the same file
    plt.rcParams["svg.fonttype"] = "none"  # text as text: the browser's font, and the labels searchable
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows, value, unit in (
        ("throughput", THROUGHPUT, "msg_s", "messages per second (100 B), more is better"),
        ("latency", LATENCY, "p50_ms", "p50 and p99 milliseconds (100 B), less is better"),
    ):
        fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(rows) * len(results)))
        labels, values, p99s, colours = [], [], [], []
        for results_ in results:
            for op, path, label in rows:
                row = _row(results_, op, path)
                if row is None:
                    continue
                labels.append(f"{label} ({_broker(results_)})")
                values.append(row[value])
                p99s.append(row.get("p99_ms", 0.0))
                colours.append("#9e9e9e" if label.startswith("raw") else "#3f51b5")
        ax.barh(range(len(values)), values, color=colours)
        if name == "latency":
            ax.scatter(p99s, range(len(p99s)), marker="|", s=200, color="black", label="p99", zorder=3)
            ax.legend(loc="lower right")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        dates = ", ".join(sorted({r["meta"]["date"] for r in results}))
        ax.set_title(f"{name}: the bus (blue) beside the raw pulsar-client (grey), {dates}", fontsize=9)
        fig.tight_layout()
        path = out / f"{name}.svg"
        fig.savefig(path, metadata={"Date": None})
        plt.close(fig)
        written.append(path)
    return written
