"""Every fit validates at its last step (:mod:`ftforget.validation`), and that validation changes no training.

The demo validates every 5 epochs of 8 steps, so a 30-step demo fit is one Lightning never validated: it now
validates at step 30 (the validation curve ends there), selects its best checkpoint there, and ``ftforget
test --run RUN --ckpt_path best`` tests it. The added validation puts the random states back: a fit without
any validation ends with the same weights, the same probe measurements and the same saved random states, and
continued from its last checkpoint it trains with exactly the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftforget.commands import main
from ftforget.methods.base import RNG_KEY
from ftforget.report import load_run
from tests.test_workflow import DEMO, accuracy_on_test_split

STEPS = 30  # below the demo's validation interval (5 epochs of 8 steps), and mid-epoch


def demo_fit(tmp_path: Path, backbone: Path, method: str, name: str, *extra: str) -> Path:
    """A ``STEPS``-step demo fit of ``configs/demo/<method>.yaml``; returns its run directory."""
    argv = [
        "fit", "--config", str(DEMO / f"{method}.yaml"), "--config", str(DEMO / "common.yaml"),
        "--model.init_args.checkpoint", str(backbone), "--trainer.max_steps", str(STEPS),
        "--trainer.log_every_n_steps", "1",
        f"--trainer.callbacks.eval_at_steps={json.dumps([0, 10, STEPS])}",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", name,
        *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return tmp_path / "runs" / name / "version_0"


@pytest.mark.slow
def test_a_short_fit_validates_at_its_last_step_and_tests_its_best_checkpoint(
    tmp_path: Path, backbone: Path, capsys
) -> None:
    run = demo_fit(tmp_path, backbone, "lora", "lora")
    val = load_run(run).scalars["val/acc1"]
    assert sorted(val) == [STEPS]  # one validation: the last step's
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-step{STEPS}-acc{val[STEPS]:.4f}.ckpt"
    assert torch.load(best, weights_only=True)["global_step"] == STEPS
    capsys.readouterr()
    assert main(["test", "--run", str(run), "--ckpt_path", "best"]) == 0
    assert "test/acc1" in capsys.readouterr().out  # Lightning's table of the test metrics
    (record,) = [json.loads(x) for x in (run / "test_results.jsonl").read_text().splitlines()]
    assert (record["checkpoint"], record["requested"], record["step"]) == (best.name, "best", STEPS)
    expected = accuracy_on_test_split(best)  # computed here by hand from the checkpoint
    assert record["test/acc1"] == pytest.approx(expected, abs=0)
    assert load_run(run).scalars["test/acc1"] == {STEPS: pytest.approx(expected, abs=0)}


@pytest.mark.slow
def test_the_added_validation_changes_no_training(tmp_path: Path, backbone: Path) -> None:
    dropout = ("--model.init_args.backbone_kwargs.drop_rate", "0.1")  # training draws from the global RNG
    validated = demo_fit(tmp_path, backbone, "full", "validated", *dropout)
    unvalidated = demo_fit(
        tmp_path, backbone, "full", "unvalidated", *dropout, "--trainer.limit_val_batches", "0"
    )
    runs = [load_run(validated), load_run(unvalidated)]
    assert sorted(runs[0].scalars["val/acc1"]) == [STEPS] and "val/acc1" not in runs[1].scalars
    assert runs[0].scalars["train/loss"] == runs[1].scalars["train/loss"]
    forgetting = [(r / "forgetting.jsonl").read_text().splitlines() for r in (validated, unvalidated)]
    lines = [[(x["step"], x["top1"], x["top5"]) for x in map(json.loads, f)] for f in forgetting]
    assert lines[0] == lines[1] and [step for step, _, _ in lines[0]] == [0, 10, STEPS]
    last = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (validated, unvalidated)]
    assert last[0]["global_step"] == last[1]["global_step"] == STEPS
    for key, value in last[0]["state_dict"].items():
        assert torch.equal(value, last[1]["state_dict"][key]), key
    states = [ckpt[RNG_KEY] for ckpt in last]
    assert torch.equal(states[0]["torch"], states[1]["torch"])  # the validation loader drew from it, put back
    assert states[0]["python"] == states[1]["python"] and states[0]["numpy"] == states[1]["numpy"]
    # Both fits continued for 2 more steps (dropout masks from the saved states, batches from the sampler's):
    # 2, since any validation inside the continued fit (a scheduled one) would draw from the random states.
    for run in (validated, unvalidated):
        assert main(["fit", "--resume", str(run), "--trainer.max_steps", str(STEPS + 2)]) == 0
    continued = [load_run(r).scalars["train/loss"] for r in (validated, unvalidated)]
    assert sorted(continued[0]) == list(range(STEPS + 2)) and continued[0] == continued[1]
    assert sorted(load_run(validated).scalars["val/acc1"]) == [STEPS, STEPS + 2]


@pytest.mark.slow
def test_a_fit_by_epochs_validates_at_the_end_of_its_last_epoch(tmp_path: Path, backbone: Path) -> None:
    run = demo_fit(
        tmp_path, backbone, "linear", "epochs", "--trainer.max_steps", "-1", "--trainer.max_epochs", "3"
    )
    # 3 epochs of 8 steps, below the validation interval of 5 epochs: one validation, at the end
    assert sorted(load_run(run).scalars["val/acc1"]) == [3 * 8]
