"""Export what a method changed, put it back onto a base: bit-identical to the run's checkpoint, for every
method; a wrong base is refused with both hashes; the paper's rows' exported sizes."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from ftforget.backbones import build_backbone
from ftforget.commands import main
from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning
from ftforget.methods.registry import load_method
from ftforget.tasks.delta import state_hash, task_tensors
from ftforget.tasks.exported import BaseMismatchError, attach_task, read_task
from tests.helpers import quiet_trainer
from tests.tiny import ARCH, TINY

#: the five methods, with arguments that exercise their surgery (LoRA on a plain Linear too)
CASES = {
    "full": (FullFineTuning, {}),
    "topk": (TopKFineTuning, {"k": 2, "train_final_norm": True}),
    "linear": (LinearProbing, {}),
    "lora": (LoRA, {"r": 2, "alpha": 4, "targets": ["q", "v", "fc1"]}),
    "block_expansion": (BlockExpansion, {"positions": [1, 3]}),
}


def save_base(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(build_backbone(ARCH, **TINY).state_dict(), path)
    return path


def fine_tuned_checkpoint(tmp: Path, name: str, base: Path) -> Path:
    """A Lightning checkpoint of the method on ``base`` with every trainable tensor moved (as training
    would: LoRA's B away from zero, the new blocks away from identity)."""
    cls, kwargs = CASES[name]
    torch.manual_seed(1)
    model = cls(num_classes=3, backbone=ARCH, backbone_kwargs=TINY, checkpoint=str(base), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    trainer = quiet_trainer(tmp)
    trainer.strategy.connect(model)
    path = tmp / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("export")
    base = save_base(tmp / "base.pth", 0)
    other = save_base(tmp / "other.pth", 1)
    ckpts = {name: fine_tuned_checkpoint(tmp, name, base) for name in CASES}
    return {"tmp": tmp, "base": base, "other": other, "ckpts": ckpts}


def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(CASES))
def test_export_then_attach_is_bit_identical_to_the_checkpoint(made: dict, name: str, capsys) -> None:
    out = made["tmp"] / f"{name}.safetensors"
    code = main(
        ["export", "--ckpt_path", str(made["ckpts"][name]), "--base", str(made["base"]), "--output", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    reference = load_method(made["ckpts"][name])
    trainable, _ = reference.parameter_counts()
    task = read_task(out)
    # Exactly the trainable tensors (and nothing else), counted as the method counts them.
    assert task.num_parameters == trainable
    assert set(task.tensors) == set(task_tensors(reference)) and {"head.weight", "head.bias"} <= set(
        task.tensors
    )
    assert f"{trainable:,} parameters, {out.stat().st_size:,} bytes" in printed
    # Metadata: the base by name and hash, the method and its arguments, the version.
    assert task.base_name == ARCH and task.method == type(reference).__name__
    assert task.base_sha256 == state_hash(torch.load(made["base"], weights_only=True))
    assert all(task.method_args[k] == v for k, v in CASES[name][1].items())
    assert task.class_names == ["0", "1", "2"] and task.class_names_source.startswith("indices")
    # On a fresh base: the checkpoint's features and logits, bit for bit.
    model = attach_task(task, build_backbone(ARCH, checkpoint=made["base"], **TINY))
    x = images()
    with torch.no_grad():
        assert torch.equal(model.features(x), reference.features(x))
        assert torch.equal(model(x), reference(x))
    for (key, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_attach_cli_writes_a_checkpoint_that_computes_the_runs_function(made: dict, capsys) -> None:
    task_file = made["tmp"] / "cli_lora.safetensors"
    assert main(["export", "--ckpt_path", str(made["ckpts"]["lora"]), "--output", str(task_file)]) == 0
    out = made["tmp"] / "attached.ckpt"
    assert main(["attach", "--task", str(task_file), "--base", str(made["base"]), "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    rebuilt, reference = load_method(out), load_method(made["ckpts"]["lora"])
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference(x))


def test_a_wrong_base_is_refused_naming_both_hashes(made: dict, capsys) -> None:
    task_file = made["tmp"] / "wrong_base.safetensors"
    assert main(["export", "--ckpt_path", str(made["ckpts"]["lora"]), "--output", str(task_file)]) == 0
    task = read_task(task_file)
    other_hash = state_hash(torch.load(made["other"], weights_only=True))
    with pytest.raises(BaseMismatchError) as err:
        attach_task(task, build_backbone(ARCH, checkpoint=made["other"], **TINY))
    assert task.base_sha256 in str(err.value) and other_hash in str(err.value)
    argv = ["attach", "--task", str(task_file), "--base", str(made["other"])]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert task.base_sha256 in line and other_hash in line and "--ignore_base_hash" in line
    assert main([*argv, "--ignore_base_hash"]) == 0  # the explicit override, said
    assert f"is not the task's base (SHA-256 {task.base_sha256}); attached anyway" in capsys.readouterr().out


def test_export_checks_the_checkpoint_against_its_base(made: dict, capsys) -> None:
    out = str(made["tmp"] / "x.safetensors")
    # LoRA's frozen weights are the base's: another base is not the one it was fine-tuned from.
    assert (
        main(
            [
                "export",
                "--ckpt_path",
                str(made["ckpts"]["lora"]),
                "--base",
                str(made["other"]),
                "--output",
                out,
            ]
        )
        == 2
    )
    assert "frozen weight 'cls_token' differs from that of the base" in capsys.readouterr().err
    # Top-k changed base weights: without the base's file there is no base to hash.
    assert main(["export", "--ckpt_path", str(made["ckpts"]["topk"]), "--output", out]) == 2
    assert "give it with --base FILE" in capsys.readouterr().err
    assert main(["export", "--ckpt_path", str(made["ckpts"]["lora"]), "--output", out[:-12] + ".pt"]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    assert main(["export", "--ckpt_path", "best", "--output", out]) == 2
    assert "give --run RUN_DIR" in capsys.readouterr().err
    assert not (made["tmp"] / "x.safetensors").exists()


def test_state_hash_is_the_documented_canonical_one() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([7], dtype=torch.int64)
    by_hand = hashlib.sha256()
    for key, t in (("a", a), ("b", b)):  # sorted keys; key, dtype, shape, little-endian bytes
        fmt = {"float32": "<4f", "int64": "<q"}[str(t.dtype)[6:]]
        by_hand.update(f"{key}\0{str(t.dtype)[6:]}\0{','.join(map(str, t.shape))}\0".encode())
        by_hand.update(struct.pack(fmt, *t.flatten().tolist()))
    assert state_hash({"b": b, "a": a}) == by_hand.hexdigest()
    assert state_hash({"a": a.t().contiguous().t(), "b": b}) == by_hand.hexdigest()  # layout-independent
    assert state_hash({"a": a.double(), "b": b}) != by_hand.hexdigest()  # dtype counts
    assert state_hash({"a": a.reshape(4), "b": b}) != by_hand.hexdigest()  # shape counts


def test_the_file_is_four_bytes_per_parameter_plus_its_header(made: dict) -> None:
    task_file = made["tmp"] / "size.safetensors"
    assert (
        main(["export", "--ckpt_path", str(made["ckpts"]["block_expansion"]), "--output", str(task_file)])
        == 0
    )
    raw = task_file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "ftforget-task/1"
    assert json.loads(header["__metadata__"]["extra"]) == {"new_block_indices": [2, 5]}
    assert len(raw) == 8 + header_len + 4 * read_task(task_file).num_parameters


#: the paper's rows on ViT-B/16 with 100 classes: exported parameters (= trainable), fp32 MB (10^6 bytes)
PAPER_ROWS = {
    "LoRA r=8": (LoRA, {"r": 8}, 371_812),
    "top-3 blocks": (TopKFineTuning, {"k": 3}, 21_340_516),
    "Block Expansion p=3": (BlockExpansion, {"p": 3}, 21_340_516),
    "full fine-tuning": (FullFineTuning, {}, 85_875_556),
    "linear probe": (LinearProbing, {}, 76_900),
}


@pytest.mark.parametrize("label", list(PAPER_ROWS))
def test_exported_sizes_of_the_papers_rows(label: str) -> None:
    """Built on the meta device (no memory, no weights): what ``ftforget export`` writes for each row."""
    cls, kwargs, expected = PAPER_ROWS[label]
    with torch.device("meta"):
        model = cls(num_classes=100, backbone="vit_base_patch16_224", **kwargs)
    exported = sum(t.numel() for t in task_tensors(model).values())
    assert exported == model.parameter_counts()[0] == expected
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## One base, many tasks") :]
    assert f"| {label} | {expected:,} | {4 * expected / 1e6:.2f} MB |" in section


def test_export_of_a_run_finds_its_checkpoint_base_and_class_names(
    made: dict, tmp_path: Path, capsys
) -> None:
    """``--run``: ``last`` resolved in the run, the class names from its data config; a base weights file
    that is gone is said, and LoRA's frozen weights stand in for it (same hash)."""
    import shutil

    import yaml

    run = tmp_path / "runs" / "lora" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(made["ckpts"]["lora"], run / "checkpoints" / "last.ckpt")
    config = {
        "model": {"init_args": {"checkpoint": str(tmp_path / "gone.pth")}},
        "data": {
            "class_path": "ftforget.data.digits.DigitsDataModule",
            "init_args": {"new_digits": [5, 6, 7]},
        },
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "lora.safetensors"
    assert main(["export", "--run", str(run), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        f"base weights file {str(tmp_path / 'gone.pth')!r} (model.init_args.checkpoint) is not here"
        in printed
    )
    task = read_task(out)
    assert (task.class_names, task.class_names_source) == (["5", "6", "7"], "data.init_args.new_digits")
    assert task.base_sha256 == state_hash(torch.load(made["base"], weights_only=True))
    assert main(["export", "--run", str(run), "--ckpt_path", "best", "--output", str(out)]) == 2
    assert "has no best checkpoint (its checkpoints: last.ckpt)" in capsys.readouterr().err


def test_moving_the_model_moves_the_base_whatever_task_is_active(made: dict) -> None:
    from ftforget.tasks.exported import read_task as read
    from ftforget.tasks.multitask import MultiTaskModel

    out = made["tmp"] / "full_move.safetensors"
    assert (
        main(
            [
                "export",
                "--ckpt_path",
                str(made["ckpts"]["full"]),
                "--base",
                str(made["base"]),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    model = MultiTaskModel(build_backbone(ARCH, checkpoint=made["base"], **TINY))
    model.add_task("full", read(out))
    model.use("full")
    model.double()
    assert model.active == "full"
    model.use(None)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.dtype for p in model.backbone.parameters()} == {torch.float64}


def test_attach_refuses_what_is_not_an_exported_task(made: dict, tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for task, message in (
        (plain, "is not a task exported by ftforget export"),
        (tmp_path / "junk.safetensors", "is not a safetensors file, or it is damaged"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ):
        assert main(["attach", "--task", str(task), "--base", str(made["base"])]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert message in line and str(task) in line


def test_frozen_helpers_outside_the_backbone_are_neither_exported_nor_needed(made: dict) -> None:
    """A training-time helper (here a frozen copy of a block, as a regulariser's step-0 copy would be) is
    not part of the function: the export leaves it out and the task attaches without it."""
    import copy

    from ftforget.tasks.delta import base_key_map
    from ftforget.tasks.exported import make_task

    reference = load_method(made["ckpts"]["lora"])
    reference.helper = copy.deepcopy(reference.backbone.blocks[0]).requires_grad_(False)
    assert not any(key.startswith("helper.") for key in base_key_map(reference))
    task = make_task(reference, state_hash(torch.load(made["base"], weights_only=True)))
    assert not any(key.startswith("helper.") for key in task.tensors)
    model = attach_task(task, build_backbone(ARCH, checkpoint=made["base"], **TINY))
    with torch.no_grad():
        assert torch.equal(model(images()), reference(images()))
