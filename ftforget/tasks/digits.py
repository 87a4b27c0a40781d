"""One base, many tasks on the digits miniature: what ``ftforget demo`` adds to its forgetting table.

Every demo run is exported (:func:`~ftforget.tasks.export.export_checkpoint`) and put onto the one
pretrained backbone (:class:`~ftforget.tasks.multitask.MultiTaskModel`). A mixed stream of old-domain
images (the probe's held-out queries, digits 0-4) and new-task images (the new digits' test split) is
then served without a task label: a :class:`~ftforget.tasks.routing.KNNRouter` on the base's features
(the probe's k-NN settings, not tuned) picks the domain; the old digits are answered by the base's own
k-NN over the probe's bank (the classifier the forgetting probe measures, on the unchanged base), the
new digits by the exported task's head. References: the oracle router, and the single fine-tuned model
(its k-NN on the old digits, which it has forgotten, and its head on the new ones).

The contrast, merging: when there is a LoRA run, a second LoRA task with its settings is trained on the
old digits' bank, and the two are merged by task arithmetic
(:func:`~ftforget.tasks.merging.merge_lora_tasks`); the merged weights' accuracy on the new task, on the
old digits (second task's head) and on the probe is measured for λ = 0.5 and 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

from ftforget.backbones import build_backbone
from ftforget.data.digits import DigitsBankDataModule, DigitsDataModule
from ftforget.files import atomic_write
from ftforget.forgetting.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_predict
from ftforget.methods.registry import method_class
from ftforget.methods.schedule import paper_recipe
from ftforget.runs import CONFIG_FILE, resolve_checkpoint
from ftforget.tasks.export import export_checkpoint
from ftforget.tasks.exported import ExportedTask, make_task
from ftforget.tasks.merging import merge_lora_tasks
from ftforget.tasks.multitask import MultiTaskModel
from ftforget.tasks.routing import KNNRouter, NearestMeanRouter, evaluate_stream

#: the file the demo writes beside its report, read by :mod:`ftforget.report.routing`
ROUTING_FILE = "routing.json"
DOMAINS = ("old", "new")
#: the second LoRA task merged with the demo's (LoRA on the old digits' bank) trains this fraction of the
#: demo LoRA run's steps (100 of the demo's 500), to keep the demo's added time small
OLD_TASK_STEP_FRACTION = 0.2
#: the task-arithmetic coefficients the demo measures
MERGE_SCALES = (0.5, 1.0)


def _knn_settings(config: dict[str, Any]) -> tuple[int, float]:
    """k and T of the run's forgetting callback (the probe's classifier), else DINO's 20 and 0.07."""
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ForgettingCallback"):
            knn = (callback.get("init_args") or {}).get("knn") or {}
            k = knn.get("k", DEFAULT_K)
            return int(k[0] if isinstance(k, list) else k), float(knn.get("temperature", DEFAULT_TEMPERATURE))
    return DEFAULT_K, DEFAULT_TEMPERATURE


def _features(model: MultiTaskModel, x: torch.Tensor, task: str | None, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.features(x[i : i + batch], task) for i in range(0, len(x), batch)])


def _logits(model: MultiTaskModel, x: torch.Tensor, task: str, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch], task) for i in range(0, len(x), batch)])


def evaluate_routing(
    base_file: str | Path,
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Exports every run (last checkpoint) to ``out_dir/tasks/``, serves the mixed stream with each, and
    writes ``out_dir/routing.json``; returns what it wrote.

    Args:
        base_file: the pretrained backbone every run was fine-tuned from.
        run_dirs: the demo's run directories (digits runs).
        out_dir: the report directory.
        say: progress lines.
    """
    out = Path(out_dir)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in run_dirs]
    configs = [yaml.safe_load((r / CONFIG_FILE).read_text()) or {} for r in runs]
    # runs/demo/<method>/seed0 (a sweep) or runs/<name>/version_N (a fit): named by <method> or <name>
    names = [r.parent.name if r.name.startswith(("version_", "seed")) else r.name for r in runs]
    if len(set(names)) != len(names):
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    exports = []
    for run, config, name in zip(runs, configs, names, strict=True):
        result = export_checkpoint(
            resolve_checkpoint(run, "last"), out / "tasks" / f"{name}.safetensors", base_file, config=config
        )
        say(result.summary())
        exports.append(result)
    first = exports[0].task
    base = build_backbone(
        first.base_name, checkpoint=base_file, **(first.method_args.get("backbone_kwargs") or {})
    )
    model = MultiTaskModel(base, base_source=str(base_file))
    for name, result in zip(names, exports, strict=True):
        model.add_task(name, result.task)

    data = DigitsDataModule(**((configs[0].get("data") or {}).get("init_args") or {}))
    data.setup()
    probe = data.probe
    probe.setup()
    bank_x, bank_y = probe.bank_tensors
    query_x, query_y = probe.query_tensors
    train_x, train_y = data.dataset("train").dataset.tensors  # the unaugmented training images
    test_x, test_y = data.dataset("test").tensors
    k, temperature = _knn_settings(configs[0])
    n_old = probe.num_classes

    stream_x = torch.cat([query_x, test_x])
    labels = torch.cat([query_y, test_y])
    domains = torch.cat(
        [torch.zeros(len(query_y), dtype=torch.long), torch.ones(len(test_y), dtype=torch.long)]
    )
    base_stream, base_bank = _features(model, stream_x, None), _features(model, bank_x, None)
    base_train = _features(model, train_x, None)
    routes = KNNRouter.fit([base_bank, base_train], DOMAINS, k, temperature).route(base_stream)
    nearest_mean = NearestMeanRouter.fit([base_bank, base_train], [bank_y, train_y], DOMAINS).route(
        base_stream
    )
    old_by_base = knn_predict(base_stream, base_bank, bank_y, n_old, [k], temperature)[k][:, 0]

    rows = []
    for name, result in zip(names, exports, strict=True):
        new_by_task = _logits(model, stream_x, name).argmax(1)
        task_stream = _features(model, stream_x, name)
        old_by_task = knn_predict(
            task_stream, _features(model, bank_x, name), bank_y, n_old, [k], temperature
        )[k][:, 0]
        evaluation = evaluate_stream(
            routes, domains, labels, torch.stack([old_by_base, new_by_task], 1), DOMAINS,
            fine_tuned_predictions=torch.stack([old_by_task, new_by_task], 1),
        )  # fmt: skip
        rows.append(
            {
                "run": str(result.task.label()),
                "name": name,
                "run_dir": str(runs[names.index(name)]),
                "task_file": str(result.path),
                "task_parameters": result.task.num_parameters,
                "task_file_bytes": result.file_bytes,
                "task_memory_bytes": model.memory().task_bytes[name],
                **evaluation.as_dict(),
            }
        )
    lora = [(name, r.task) for name, r in zip(names, exports, strict=True) if r.task.method == "LoRA"]
    merging = None
    if lora:
        run_steps = int(((configs[names.index(lora[0][0])].get("trainer") or {}).get("max_steps")) or 500)
        steps = max(1, round(OLD_TASK_STEP_FRACTION * run_steps))
        old_task = train_old_domain_lora(base_file, lora[0][1], model.base_sha256, data, steps, say=say)
        with model.using(None):
            merging = merging_contrast(
                model.backbone, lora[0][1], old_task, (bank_x, bank_y), (query_x, query_y), (test_x, test_y),
                k, temperature,
            )  # fmt: skip
        merging["new_task"] = lora[0][0]
        merging["old_task"] = (
            f"{old_task.label()} trained {steps} step{'s' if steps != 1 else ''} on the old digits' bank"
        )
    memory = model.memory()
    report = {
        "router": f"weighted k-NN vote (k={k}, T={temperature}) of the base's features of the old bank and the "
        "new training split, labelled by domain",
        "other_routers": {
            "nearest class mean (cosine)": int((nearest_mean == domains).sum()) / len(domains),
        },
        "old_classifier": f"the base's weighted k-NN over the probe's bank (k={k}, T={temperature})",
        "stream": {"old": int(len(query_y)), "new": int(len(test_y))},
        "base_sha256": model.base_sha256,
        "base_bytes": memory.base_bytes,
        "total_bytes": memory.total_bytes,
        "runs": [str(r.resolve()) for r in runs],
        "rows": rows,
        "merging": merging,
    }
    atomic_write(out / ROUTING_FILE, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return report


def train_old_domain_lora(
    base_file: str | Path,
    like: ExportedTask,
    base_sha256: str,
    data: DigitsDataModule,
    steps: int = 100,
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> ExportedTask:
    """A second LoRA task on the same base, the one merged with the demo's: ``like``'s LoRA settings,
    trained ``steps`` steps (SGD, lr 0.1, 10 warmup steps) to classify the old digits of the probe's bank
    (the images the base was pretrained on; the probe's queries stay held out)."""
    probe = data.probe
    L.seed_everything(seed, verbose=False)
    bank = DigitsBankDataModule(probe.digits, probe.image_size, probe.split_seed, batch_size=64)
    args = {**like.build_args(), "num_classes": bank.num_classes, "checkpoint": str(base_file)}
    model = method_class("LoRA")(**{**args, **paper_recipe(lr=0.1, warmup_steps=10)})
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=bank)
    say(f"trained a second LoRA task on the old digits ({steps} steps) to merge with the new one")
    return make_task(model.eval(), base_sha256, [str(d) for d in probe.digits], "the old digits")


def _head(task: ExportedTask) -> nn.Linear:
    weight = task.tensors["head.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": task.tensors["head.bias"]})
    return head.eval()


def merging_contrast(
    base: nn.Module,
    new_task: ExportedTask,
    old_task: ExportedTask,
    bank: tuple[torch.Tensor, torch.Tensor],
    queries: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int,
    temperature: float,
    scales: Sequence[float] = MERGE_SCALES,
) -> dict[str, Any]:
    """Accuracies of the merged weights ``W0 + λ (ΔW_new + ΔW_old)`` for each λ in ``scales``: the new
    task (its head), the old domain with the old task's head, and the probe (k-NN of the merged features
    over the bank). The same with each task alone (λ = 1, the other task's update left out)."""
    new_head, old_head = _head(new_task), _head(old_task)
    n_old = int(old_task.tensors["head.weight"].shape[0])

    def measure(backbone: nn.Module) -> dict[str, float]:
        backbone.eval()
        with torch.no_grad():
            new_acc = (new_head(backbone(test[0])).argmax(1) == test[1]).float().mean()
            query_feats = backbone(queries[0])
            old_acc = (old_head(query_feats).argmax(1) == queries[1]).float().mean()
            knn = knn_predict(query_feats, backbone(bank[0]), bank[1], n_old, [k], temperature)[k][:, 0]
        probe_acc = (knn == queries[1]).float().mean()
        return {"new_task_acc": float(new_acc), "old_task_acc": float(old_acc), "probe_acc": float(probe_acc)}

    return {
        "new_alone": measure(merge_lora_tasks(base, [new_task])),
        "old_alone": measure(merge_lora_tasks(base, [old_task])),
        "base": measure(base),
        "merged": [
            {"scale": float(scale), **measure(merge_lora_tasks(base, [new_task, old_task], scale))}
            for scale in scales
        ],
    }
