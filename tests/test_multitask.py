"""One backbone, many exported tasks: the base task is the pretrained function exactly, each task its own
run's, a LoRA switch moves references only, Block Expansion's base skips the new blocks, memory adds up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftforget.adapters.lora import LoRALinear
from ftforget.backbones import build_backbone
from ftforget.methods.registry import load_method
from ftforget.tasks.delta import state_hash
from ftforget.tasks.exported import BaseMismatchError, make_task
from ftforget.tasks.merging import merge_lora_tasks
from ftforget.tasks.multitask import MultiTaskModel
from tests.test_export import CASES, fine_tuned_checkpoint, save_base
from tests.tiny import ARCH, TINY


class CountOps(TorchDispatchMode):
    """Counts every tensor operation (allocation, copy, arithmetic) dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multitask")
    base_file = save_base(tmp / "base.pth", 0)
    base_hash = state_hash(torch.load(base_file, weights_only=True))
    models = {name: load_method(fine_tuned_checkpoint(tmp, name, base_file)) for name in CASES}
    model = MultiTaskModel(build_backbone(ARCH, checkpoint=base_file, **TINY), base_source=str(base_file))
    for name, method in models.items():
        model.add_task(name, make_task(method, base_hash))
    return {"tmp": tmp, "base_file": base_file, "models": models, "model": model, "hash": base_hash}


def test_each_task_is_its_own_run_and_the_base_is_the_pretrained_function(served: dict) -> None:
    model, models = served["model"], served["models"]
    pretrained = build_backbone(ARCH, checkpoint=served["base_file"], **TINY).eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    order = [None, "lora", "full", None, "block_expansion", "topk", "lora", "linear", None, "block_expansion"]
    with torch.no_grad():
        for task in order:  # switched per batch, in any order
            if task is None:
                assert torch.equal(model.features(x), pretrained(x))
            else:
                assert torch.equal(model.features(x, task), models[task].features(x)), task
                assert torch.equal(model(x, task), models[task](x)), task
    assert model.active is None  # features(x, task) switches back


def test_a_lora_switch_copies_no_weight(served: dict) -> None:
    model = served["model"]
    before = {k: v.data_ptr() for k, v in model.backbone.state_dict().items()}
    with CountOps() as counted:
        model.use("lora")
        model.use(None)
        model.use("lora")
    assert counted.ops == []  # no allocation, no copy, no arithmetic: references move
    wrappers = [m for m in model.backbone.modules() if isinstance(m, LoRALinear)]
    assert len(wrappers) == 2 * TINY["depth"]  # qkv and fc1 in every block
    model.use(None)
    plain = dict(model.backbone.named_modules())
    for m in wrappers:  # each wraps the shared Linear itself
        assert any(m.base is module for module in plain.values())
    with torch.no_grad():
        model.features(torch.randn(2, 3, 32, 32), "lora")
    assert {k: v.data_ptr() for k, v in model.backbone.state_dict().items()} == before


def test_block_expansion_base_skips_the_new_blocks(served: dict) -> None:
    model = served["model"]
    calls: list[int] = []
    with model.using("block_expansion"):
        blocks = list(model.backbone.blocks)
    new_blocks = [blocks[2], blocks[5]]  # positions [1, 3] -> new indices 2 and 5
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in new_blocks]
    try:
        with torch.no_grad():
            model.features(torch.randn(2, 3, 32, 32))
            assert (len(model.backbone.blocks), calls) == (TINY["depth"], [])
            model.features(torch.randn(2, 3, 32, 32), "block_expansion")
            assert len(calls) == 2
    finally:
        for h in hooks:
            h.remove()


def test_memory_is_the_base_once_plus_each_tasks_delta(served: dict) -> None:
    model, models = served["model"], served["models"]
    report = model.memory()
    pretrained = build_backbone(ARCH, **TINY)
    assert report.base_bytes == 4 * sum(p.numel() for p in pretrained.parameters())
    for name, method in models.items():
        assert report.task_bytes[name] == 4 * method.parameter_counts()[0], name
    assert report.total_bytes == report.base_bytes + sum(report.task_bytes.values())


def test_a_task_of_another_base_is_refused(served: dict) -> None:
    other = MultiTaskModel(build_backbone(ARCH, checkpoint=save_base(served["tmp"] / "o.pth", 1), **TINY))
    task = make_task(served["models"]["lora"], served["hash"])
    with pytest.raises(BaseMismatchError, match=served["hash"]):
        other.add_task("lora", task)
    other.add_task("lora", task, ignore_base_hash=True)


def test_merging_lora_tasks_is_task_arithmetic(served: dict, tmp_path: Path) -> None:
    """One task merged at scale 1 is that task's merged model; two are W0 + λ(ΔW1 + ΔW2), by hand."""
    base = build_backbone(ARCH, checkpoint=served["base_file"], **TINY).eval()
    first = served["models"]["lora"]
    second = load_method(fine_tuned_checkpoint(tmp_path, "lora", served["base_file"]))
    with torch.no_grad():
        for p in second.parameters():
            if p.requires_grad:
                p.mul_(-0.5)  # another task: other adapters
    tasks = [make_task(first, served["hash"]), make_task(second, served["hash"])]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), first.merged():
        torch.testing.assert_close(merge_lora_tasks(base, tasks[:1])(x), first.features(x), rtol=0, atol=1e-5)
    merged = merge_lora_tasks(base, tasks, scale=0.5)
    dim = TINY["embed_dim"]
    for block in (0, 3):
        qkv = [m.backbone.blocks[block].attn.qkv for m in (first, second)]
        fc1 = [m.backbone.blocks[block].mlp.fc1 for m in (first, second)]
        w0, w = base.blocks[block].attn.qkv.weight, merged.blocks[block].attn.qkv.weight
        for name, rows in (("q", slice(0, dim)), ("v", slice(2 * dim, 3 * dim))):
            by_hand = w0[rows] + 0.5 * (qkv[0].delta_weight(name) + qkv[1].delta_weight(name))
            torch.testing.assert_close(w[rows], by_hand, rtol=0, atol=1e-6)
        assert torch.equal(w[dim : 2 * dim], w0[dim : 2 * dim])  # k is not adapted
        by_hand = base.blocks[block].mlp.fc1.weight + 0.5 * (
            fc1[0].delta_weight("fc1") + fc1[1].delta_weight("fc1")
        )
        torch.testing.assert_close(merged.blocks[block].mlp.fc1.weight, by_hand, rtol=0, atol=1e-6)
        assert torch.equal(merged.blocks[block].mlp.fc2.weight, base.blocks[block].mlp.fc2.weight)
    assert state_hash(base.state_dict()) == served["hash"]  # the base is left alone
    with pytest.raises(ValueError, match="merges LoRA tasks"):
        merge_lora_tasks(base, [make_task(served["models"]["topk"], served["hash"])])
