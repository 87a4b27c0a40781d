"""Routing without a task label: a hand-computed case, and the demo's routing table end to end."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from ftforget.commands import main
from ftforget.report import read_csv
from ftforget.report.routing import routing_markdown
from ftforget.tasks.exported import read_task
from ftforget.tasks.routing import KNNRouter, NearestMeanRouter, evaluate_stream

ROOT = Path(__file__).resolve().parent.parent


def test_routing_and_stream_accuracies_by_hand() -> None:
    # Class means of the normalised training features: old (1,0) and (0,1); new (-1,0) and (0,-1).
    router = NearestMeanRouter.fit(
        [torch.tensor([[2.0, 0], [1, 0], [0, 3]]), torch.tensor([[-1.0, 0], [0, -1], [0, -5]])],
        [torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])],
        ["old", "new"],
    )
    assert torch.equal(router.means, torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    assert torch.equal(router.owners, torch.tensor([0, 0, 1, 1]))
    stream = torch.tensor([[3.0, 1], [1, 2], [-2, -1], [1, -3], [-1, 2], [2, -1.9]])
    routes = router.route(stream)
    # cosines: image 5 (-1,2) is nearest (0,1) (0.894 > 0.447): routed to old, though it is new;
    # image 6 (2,-1.9) is nearest (1,0) (0.725 > 0.689): old, rightly.
    assert routes.tolist() == [0, 0, 1, 1, 0, 0]
    domains = torch.tensor([0, 0, 1, 1, 1, 0])
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    predictions = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1], [0, 0], [0, 1]])  # (old's, new's) answer
    fine_tuned = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0], [0, 0], [0, 1]])
    result = evaluate_stream(routes, domains, labels, predictions, ["old", "new"], fine_tuned)
    assert result.routing_accuracy == 5 / 6
    # routed: 1-4 right; 5 misrouted; 6 routed right but old's answer 0 is not its label 1
    assert (result.routed.correct, result.routed.total, result.routed.overall) == (4, 6, 4 / 6)
    assert result.routed.per_domain == {"old": 2 / 3, "new": 2 / 3}
    # oracle: image 5 goes to new, whose answer 0 is right; image 6 still wrong
    assert (result.oracle.correct, result.oracle.per_domain) == (5, {"old": 2 / 3, "new": 1.0})
    # the fine-tuned model (its forgotten old answers): right on images 2, 3 and 5
    assert (result.fine_tuned.correct, result.fine_tuned.per_domain) == (3, {"old": 1 / 3, "new": 2 / 3})


def test_knn_router_by_hand() -> None:
    # Training images of the two tasks, labelled by task: old ones near +x, new ones near -x and +y.
    old = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1]])
    new = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    stream = torch.tensor([[1.0, 0.05], [-1.0, 0.2], [0.6, 1.0], [0.6, 0.5]])
    # Cosines of (0.6, 0.5): old 0.77, 0.83, 0.70; new -0.77, 0.64, 0.71. Of (0.6, 1): old 0.51, 0.60,
    # 0.43; new -0.51, 0.86, 0.90.
    # k = 1: the nearest training image's task; (0.6, 0.5) is nearest (1, 0.1), an old one.
    assert KNNRouter.fit([old, new], ["old", "new"], k=1).route(stream).tolist() == [0, 1, 1, 0]
    # k = 3 with equal votes (T huge): the majority of the 3 nearest. (0.6, 0.5): two old (0.83, 0.77), one
    # new (0.71): old. (0.6, 1): two new (0.90, 0.86), one old (0.60): new.
    router = KNNRouter.fit([old, new], ["old", "new"], k=3, temperature=1e6)
    assert router.route(stream).tolist() == [0, 1, 1, 0]
    # (0, -1) is nearest (1, -0.1), cosine 0.10, ahead of (1, 0) and (-1, 0) at 0: old.
    assert KNNRouter.fit([old, new], ["old", "new"], k=1).route(torch.tensor([[0.0, -1.0]])).tolist() == [0]
    # k = 3 with T = 0.07 for (0.6, 1): weights exp((sim - 0.90) / 0.07): new 1 + exp(-0.047/0.07) = 1.51,
    # old exp(-0.307/0.07) = 0.012: new.
    assert KNNRouter.fit([old, new], ["old", "new"], k=3).route(stream[2:3]).tolist() == [1]


def test_the_routing_table_renders_the_numbers() -> None:
    acc = {"overall": 0.5, "per_domain": {"old": 0.25, "new": 0.75}, "correct": 2, "total": 4}
    data = {
        "router": "r", "old_classifier": "k", "stream": {"old": 2, "new": 2}, "base_bytes": 10, "total_bytes": 30,
        "rows": [{"run": "LoRA r=4", "routing_accuracy": 0.75, "routed": acc, "fine_tuned": acc, "oracle": acc,
                  "task_parameters": 4421, "task_file_bytes": 2048}],
    }  # fmt: skip
    assert (
        "| LoRA r=4 | 75.0 | 50.0 (25.0 / 75.0) | 50.0 (25.0 / 75.0) | 50.0 (25.0 / 75.0) | 4,421 | 2.0 KiB |"
        in (routing_markdown(data))
    )


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## One base, many tasks")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else None]


def readme_commands() -> list[list[str]]:
    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme_section(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("ftforget "):
                found.append(shlex.split(line.strip(), comments=True)[1:])
    return found


@pytest.mark.slow
def test_demo_routing_and_the_readme_commands(tmp_path: Path, capsys, monkeypatch) -> None:
    """The README section's commands as written (a short demo; ``runs/`` under a temporary directory):
    the demo's routing table agrees with its forgetting table, and the attached task measures exactly
    what the run measured at its last step."""
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[0] for c in commands] == ["demo", "export", "attach", "measure"]
    for argv in commands:
        argv = [a for arg in argv for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
        if argv[0] == "demo":
            argv += ["--steps", "3", "--pretrain-steps", "5", "--methods", "linear,lora"]
        assert main(argv) == 0, shlex.join(argv)
    printed = capsys.readouterr().out
    report = tmp_path / "runs" / "demo" / "report"
    routing = json.loads((report / "routing.json").read_text())
    assert (
        "### One base, many tasks: routing without a task label"
        in (report / "forgetting_table.md").read_text()
    )
    assert "| LoRA r=4 | " in printed and "exported LoRA r=4" in printed
    table = {row["method"]: row for row in read_csv(report / "forgetting_table.csv")}
    for row in routing["rows"]:
        forgetting = table[row["run"]]
        n_old = routing["stream"]["old"]
        # The oracle serves the old digits with the base's k-NN: the probe's measurement at step 0.
        assert round(row["oracle"]["per_domain"]["old"] * n_old) == round(
            float(forgetting["probe_acc_step0"]) * n_old
        )
        # Both serve the new digits with the task's head: the run's test accuracy.
        assert row["oracle"]["per_domain"]["new"] == row["fine_tuned"]["per_domain"]["new"]
        assert abs(row["fine_tuned"]["per_domain"]["new"] - float(forgetting["new_task_test_acc1"])) < 1e-6
        # The fine-tuned model serves the old digits with its own k-NN: the probe's last measurement.
        assert round(row["fine_tuned"]["per_domain"]["old"] * n_old) == round(
            float(forgetting["probe_acc_end"]) * n_old
        )
        assert row["routed"]["overall"] <= row["oracle"]["overall"]
        assert (report / "tasks" / f"{row['name']}.safetensors").stat().st_size == row["task_file_bytes"]
    # Merging, the contrast: the demo's LoRA task merged alone is its run (the probe measured it merged).
    merging, lora_row, n_old = routing["merging"], table["LoRA r=4"], routing["stream"]["old"]
    assert round(merging["new_alone"]["probe_acc"] * n_old) == round(float(lora_row["probe_acc_end"]) * n_old)
    assert round(merging["base"]["probe_acc"] * n_old) == round(float(lora_row["probe_acc_step0"]) * n_old)
    assert [m["scale"] for m in merging["merged"]] == [0.5, 1.0]
    assert "| merged, λ = 0.5 |" in (report / "forgetting_table.md").read_text()
    # The export names the new task's classes as the run's data module does.
    exported = read_task(tmp_path / "runs" / "lora.safetensors")
    assert (exported.class_names, exported.class_names_source) == (
        ["5", "6", "7", "8", "9"],
        "data.init_args.new_digits",
    )
    # The README's library example, as written.
    (example,) = re.findall(r"```python\n(.*?)```", readme_section(), flags=re.S)
    exec(compile(example, "README.md", "exec"), {})
    memory = capsys.readouterr().out
    assert re.search(
        r"^base: [\d,]+ bytes\ntask lora: \+[\d,]+ bytes\ntask linear: \+[\d,]+ bytes\ntotal: ", memory
    )
    # ftforget measure on the attached task: the run's own last measurement, to the hit.
    last = json.loads(
        (tmp_path / "runs" / "demo" / "lora" / "seed0" / "forgetting.jsonl").read_text().splitlines()[-1]
    )
    hits = round(last["top1"] * last["num_queries"])
    assert f"top-1 {100 * last['top1']:.2f}% ({hits}/{last['num_queries']})" in printed
