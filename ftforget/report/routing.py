"""The routing table: one base and many tasks served without a task label, beside the forgetting table.

``ftforget demo`` writes ``routing.json`` into its report directory (:mod:`ftforget.tasks.digits`); this
module reads it and renders one row per method: routing accuracy, the routed stream's overall accuracy
(and per domain), the single fine-tuned model's, the oracle router's, and the exported task's size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROUTING_FILE = "routing.json"


def read_routing(path: str | Path) -> dict[str, Any]:
    """The routing results a demo wrote (``routing.json``)."""
    return json.loads(Path(path).read_text())


def _cell(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "-"
    per = acc["per_domain"]
    return f"{100 * acc['overall']:.1f} ({100 * per['old']:.1f} / {100 * per['new']:.1f})"


def routing_markdown(data: dict[str, Any]) -> str:
    """The routing section: a Markdown table and the lines that say how it was measured."""
    stream = data["stream"]
    lines = [
        "### One base, many tasks: routing without a task label",
        "",
        f"Mixed stream of {stream['old']} old-domain and {stream['new']} new-task images. Router: "
        f"{data['router']}. Old domain served by {data['old_classifier']}; new task by the exported task. "
        "Accuracies in % as overall (old / new); an answer counts only from the right task with the right class.",
        "",
        "| method | routing acc. | routed | fine-tuned model | oracle router | task parameters | task file |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['run']} | {100 * row['routing_accuracy']:.1f} | {_cell(row['routed'])} | "
            f"{_cell(row['fine_tuned'])} | {_cell(row['oracle'])} | {row['task_parameters']:,} | "
            f"{row['task_file_bytes'] / 1024:.1f} KiB |"
        )
    others = "; ".join(f"{name} {100 * acc:.1f}%" for name, acc in (data.get("other_routers") or {}).items())
    if others:
        lines += ["", f"Routing accuracy of other routers on the same stream: {others}."]
    lines += [
        "",
        f"Memory: base {data['base_bytes']:,} bytes once, all tasks together {data['total_bytes']:,} bytes.",
    ]
    if data.get("merging"):
        lines += ["", *merging_lines(data["merging"])]
    return "\n".join(lines) + "\n"


def merging_lines(merging: dict[str, Any]) -> list[str]:
    """The contrast: two LoRA tasks merged into one set of weights (task arithmetic) instead of routed."""

    def row(label: str, acc: dict[str, float]) -> str:
        cells = (acc["new_task_acc"], acc["old_task_acc"], acc["probe_acc"])
        return f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |"

    return [
        f"Merging instead of routing: the {merging['new_task']} task and a second one ({merging['old_task']}) "
        "merged by task arithmetic, W0 + λ (ΔW_new + ΔW_old); each head on the merged features, the probe's "
        "k-NN on them. Accuracies in %.",
        "",
        "| weights | new task | old digits (old task's head) | probe k-NN (old digits) |",
        "|---|---|---|---|",
        row("base (no task)", merging["base"]),
        row("new task alone", merging["new_alone"]),
        row("old task alone", merging["old_alone"]),
        *(row(f"merged, λ = {m['scale']:g}", m) for m in merging["merged"]),
    ]


def routing_section(out_dir: Path, run_paths: list[Path]) -> str:
    """The routing section for a report in ``out_dir``, or ``""`` when its ``routing.json`` is absent or
    was written for other runs than ``run_paths`` (a stale file is never shown)."""
    path = out_dir / ROUTING_FILE
    if not path.is_file():
        return ""
    data = read_routing(path)
    reported = {str(Path(p).resolve()) for p in run_paths}
    if not data.get("rows") or not set(data.get("runs", [])) <= reported:
        return ""
    return routing_markdown(data)
