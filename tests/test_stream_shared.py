"""Class-incremental streams (``heads: shared``): one head over every class so far.

The model's side (``label_offset``, ``earlier_head_from``): labels offset in the loss and the accuracies, the
earlier rows copied exactly and trained on, the defaults bit-identical to a plain method; the stream's side:
the accuracy over every class seen so far on a hand-made head, an end-to-end three-task digits stream
checked against a recomputation from its files, a SIGKILL during task 2 and a restart, and the bad values of
the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftforget.commands import main
from ftforget.methods import FullFineTuning, LoRA
from ftforget.methods.schedule import paper_recipe
from ftforget.stream import carry
from ftforget.stream.metrics import stream_metrics
from tests.helpers import RandomImages, quiet_trainer
from tests.test_regularizers import Snapshots
from tests.test_stream import kill_during_task_2, stream_file
from tests.tiny import TINY_ARGS


def _make(cls=FullFineTuning, num_classes=5, **kwargs):
    torch.manual_seed(0)
    return cls(num_classes=num_classes, **paper_recipe(lr=0.5, warmup_steps=0), **TINY_ARGS, **kwargs)


class _Split:
    """A data module's test split only: what :func:`test_hits` reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def setup(self, stage: str) -> None:
        assert stage == "test"

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=2)


def test_class_incremental_hits_are_the_argmax_over_every_class_seen() -> None:
    # 6 classes: task 1's 0-1, task 2's 2-3, task 3's 4-5; the feature is the logit vector itself
    head = nn.Linear(6, 6)
    with torch.no_grad():
        head.weight.copy_(torch.eye(6))
        head.bias.zero_()
    logits = torch.tensor([
        [0, 0, 1, 5, 0, 0],  # task 2 label 1 -> class 3: right
        [0, 0, 5, 1, 0, 0],  # task 2 label 1 -> class 2: wrong
        [9, 0, 1, 5, 0, 0],  # task 2 label 1: right among task 2's classes, but class 0 wins: wrong
        [0, 0, 7, 1, 8, 0],  # task 2 label 0: class 4 (a later task's) wins: wrong
        [0, 0, 3, 2, 0, 0],  # task 2 label 0 -> class 2: right
    ], dtype=torch.float)  # fmt: skip
    labels = torch.tensor([1, 1, 1, 0, 0])  # the task's own labels, 0..1
    hits = carry.test_hits(nn.Identity(), head, _Split(logits, labels), label_offset=2)
    assert hits.tolist() == [True, False, False, False, True]
    # task-incremental on the same logits (task 2's own rows only) would score the third image right
    own = nn.Linear(6, 2)
    with torch.no_grad():
        own.weight.copy_(torch.eye(6)[2:4])
        own.bias.zero_()
    assert carry.test_hits(nn.Identity(), own, _Split(logits, labels)).tolist() == [
        True,
        False,
        True,
        True,
        True,
    ]


def test_the_label_offset_shifts_the_loss_and_the_accuracies(tmp_path) -> None:
    model = _make(num_classes=5, label_offset=3)
    assert model.head.out_features == 8 and model.hparams.num_classes == 5
    data = RandomImages(num_classes=5)
    x, y = data.x, data.y
    result = quiet_trainer(tmp_path).validate(model, data, verbose=False)[0]
    with torch.no_grad():
        logits = model.eval()(x)
    expected = (logits.argmax(1) == y + 3).float().mean().item()
    assert result["val/acc1"] == pytest.approx(expected, abs=1e-7)
    assert result["val/loss"] == pytest.approx(nn.functional.cross_entropy(logits, y + 3).item(), rel=1e-5)
    assert FullFineTuning.describe({"label_offset": 3}).endswith(" + 3 earlier classes")
    assert FullFineTuning.describe({}) == FullFineTuning.describe({"label_offset": 0})


def test_the_defaults_train_bit_identically_to_the_plain_method(tmp_path) -> None:
    plain, explicit = _make(LoRA, r=2), _make(LoRA, r=2, label_offset=0, earlier_head_from=None)
    assert list(explicit.state_dict()) == list(plain.state_dict())
    for model in (plain, explicit):
        quiet_trainer(tmp_path, max_steps=3).fit(model, RandomImages())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[key]), key


def test_the_earlier_rows_start_as_the_previous_head_and_keep_training(tmp_path) -> None:
    first = _make(num_classes=2)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(first, RandomImages(num_classes=2))
    ckpt = tmp_path / "task1.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = _make(num_classes=3, label_offset=2)  # the same seed, no earlier head: the new rows' draw
    second = _make(num_classes=3, label_offset=2, earlier_head_from=str(ckpt))
    snaps = Snapshots([0])
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[snaps])
    trainer.fit(second, RandomImages(num_classes=3, seed=1))
    at0 = snaps.states[0]
    assert torch.equal(at0["head.weight"][:2], first.head.weight)
    assert torch.equal(at0["head.bias"][:2], first.head.bias)
    assert torch.equal(at0["head.weight"][2:], fresh.head.weight[2:])
    assert torch.equal(at0["head.bias"][2:], fresh.head.bias[2:])
    assert not torch.equal(second.head.weight[:2], first.head.weight)  # no freezing: the earlier rows train
    # a checkpoint holds the head itself, not the file it started from
    trainer.save_checkpoint(tmp_path / "task2.ckpt")
    saved = torch.load(tmp_path / "task2.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["earlier_head_from"] is None and saved["label_offset"] == 2


def test_bad_head_options_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"model.init_args.label_offset must be an integer >= 0, got -1"):
        _make(label_offset=-1)
    with pytest.raises(
        ValueError, match=r"model.init_args.earlier_head_from needs model.init_args.label_offset"
    ):
        _make(earlier_head_from="x.ckpt")
    with pytest.raises(FileNotFoundError, match=r"model.init_args.earlier_head_from: checkpoint file"):
        _make(label_offset=2, earlier_head_from=str(tmp_path / "none.ckpt"))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(_make(num_classes=3), RandomImages(num_classes=3))
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    with pytest.raises(ValueError, match=r"the head in .* is \(3, 32\) .*; with model.init_args.label_offset 2 it must be \(2, 32\)"):  # fmt: skip
        _make(label_offset=2, earlier_head_from=str(tmp_path / "three.ckpt"))


@pytest.mark.parametrize("value", ["both", 1, ["shared"]])
def test_a_bad_heads_value_fails_in_one_line_naming_the_key(tmp_path, backbone, capsys, value) -> None:
    path = stream_file(tmp_path, backbone, heads=value)
    assert main(["stream", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"heads must be one of ['task', 'shared'], got {value!r}" in err, err
    assert str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _run(path: Path, out: Path) -> int:
    return main(["stream", "--config", str(path), "--output", str(out)])


NAMES = ["1-d45", "2-d67", "3-d89"]


@pytest.mark.slow
def test_a_shared_head_stream_end_to_end_and_after_a_kill(tmp_path, backbone, capsys) -> None:
    path = stream_file(tmp_path, backbone, heads="shared")
    assert _run(path, tmp_path / "whole") == 0
    out = capsys.readouterr().out
    assert "task i's shared head, the argmax over the classes of tasks 1..i (class-incremental)" in out
    root = tmp_path / "whole" / "full" / "seed0"
    offsets = [0, 2, 4]  # two new digits per task
    for i, name in enumerate(NAMES):
        init = yaml.safe_load((root / name / "config.yaml").read_text())["model"]["init_args"]
        assert init["label_offset"] == offsets[i]
        assert init.get("earlier_head_from") == (None if i == 0 else str(root / NAMES[i - 1] / "checkpoints" / "last.ckpt"))  # fmt: skip
        assert carry.task_head(root / name / "checkpoints" / "last.ckpt").out_features == offsets[i] + 2
    matrix = json.loads((root / "accuracy_matrix.json").read_text())
    assert matrix["heads"] == "shared" and matrix["label_offsets"] == offsets
    assert matrix["tasks"] == NAMES and [len(r["correct"]) for r in matrix["rows"]] == [1, 2, 3]
    # every R[i][j] recomputed from the files: task i's head and carried backbone, task j's test split,
    # labels + offset, the argmax over all 2(i+1) classes
    for i in range(3):
        backbone_i, _ = carry.read_carried(root / "carried" / f"{NAMES[i]}.pth")
        head = carry.task_head(root / NAMES[i] / "checkpoints" / "last.ckpt")
        backbone_i.eval()
        for j in range(i + 1):
            data = carry.run_data_module(root / NAMES[j])
            data.setup("test")
            correct = total = 0
            with torch.no_grad():
                for x, y, *_ in data.test_dataloader():
                    correct += int((head(backbone_i(x)).argmax(1) == y + offsets[j]).sum())
                    total += len(y)
            assert (matrix["rows"][i]["correct"][j], matrix["rows"][i]["total"][j]) == (correct, total)
    # the diagonal is each sub-run's own test (the same head, the same offset)
    for i, name in enumerate(NAMES):
        test = json.loads((root / name / "test_results.jsonl").read_text().splitlines()[-1])
        assert matrix["rows"][i]["correct"][i] / matrix["rows"][i]["total"][i] == pytest.approx(test["test/acc1"], abs=1e-7)  # fmt: skip
    R = [[r["correct"][j] / r["total"][j] if j < len(r["correct"]) else None for j in range(3)] for r in matrix["rows"]]  # fmt: skip
    metrics = json.loads((root / "stream_metrics.json").read_text())
    assert metrics["heads"] == "shared" and metrics["R"] == R
    assert {k: metrics[k] for k in stream_metrics(R)} == stream_metrics(R)

    # killed during task 2, started again: the same weights and files as the uninterrupted stream
    cut = tmp_path / "cut" / "full" / "seed0"
    task2 = kill_during_task_2(path, tmp_path / "cut", cut)
    assert 0 < torch.load(task2, weights_only=True)["global_step"] < 6  # between its checkpoints
    assert _run(path, tmp_path / "cut") == 0
    for name in NAMES:
        a, b = (torch.load(r / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in (root, cut))  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for file in ("accuracy_matrix.json", "stream_metrics.json"):
        assert (root / file).read_text() == (cut / file).read_text()

    # hot_swap switched on afterwards: the references are single-task fits with their own heads; the
    # single-task transfer (within a task's classes) is not comparable with a shared head's R[j][j]: null
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "hot_swap": True}))
    assert _run(path, tmp_path / "whole") == 0
    assert (root / "accuracy_matrix.json").read_text() == (cut / "accuracy_matrix.json").read_text()
    for i in (1, 2):
        init = yaml.safe_load((root / f"ref-{NAMES[i]}" / "config.yaml").read_text())["model"]["init_args"]
        assert init["label_offset"] == 0 and init["checkpoint"] == str(backbone)
    swap = json.loads((root / "hot_swap.json").read_text())
    metrics = json.loads((root / "stream_metrics.json").read_text())
    assert (
        len(swap["oracle"]) == 3 and metrics["reference"] is None and metrics["single_task_transfer"] is None
    )
    assert "hot-swap (each task alone from the start weights)" in capsys.readouterr().out
