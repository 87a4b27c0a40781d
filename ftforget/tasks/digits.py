"""One base, many tasks on the digits miniature: what ``ftforget demo`` adds to its forgetting table.

Every demo run is exported (:func:`~ftforget.tasks.export.export_checkpoint`) and put onto the one
pretrained backbone (:class:`~ftforget.tasks.multitask.MultiTaskModel`). A mixed stream of old-domain
images (the probe's held-out queries, digits 0-4) and new-task images (the new digits' test split) is
then served without a task label: a :class:`~ftforget.tasks.routing.NearestMeanRouter` on the base's
features picks the domain; the old digits are answered by the base's own k-NN over the probe's bank (the
classifier the forgetting probe measures, on the unchanged base), the new digits by the exported task's
head. References: the oracle router, and the single fine-tuned model (its k-NN on the old digits, which
it has forgotten, and its head on the new ones).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ftforget.backbones import build_backbone
from ftforget.data.digits import DigitsDataModule
from ftforget.files import atomic_write
from ftforget.forgetting.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_predict
from ftforget.runs import CONFIG_FILE, resolve_checkpoint
from ftforget.tasks.export import export_checkpoint
from ftforget.tasks.multitask import MultiTaskModel
from ftforget.tasks.routing import NearestMeanRouter, evaluate_stream

#: the file the demo writes beside its report, read by :mod:`ftforget.report.routing`
ROUTING_FILE = "routing.json"
DOMAINS = ("old", "new")


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
    base_stream = _features(model, stream_x, None)
    router = NearestMeanRouter.fit(
        [_features(model, bank_x, None), _features(model, train_x, None)], [bank_y, train_y], DOMAINS
    )
    routes = router.route(base_stream)
    base_bank = _features(model, bank_x, None)
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
    memory = model.memory()
    report = {
        "router": "nearest class mean of the base's features (cosine), over the old bank and the new training split",
        "old_classifier": f"the base's weighted k-NN over the probe's bank (k={k}, T={temperature})",
        "stream": {"old": int(len(query_y)), "new": int(len(test_y))},
        "base_sha256": model.base_sha256,
        "base_bytes": memory.base_bytes,
        "total_bytes": memory.total_bytes,
        "runs": [str(r.resolve()) for r in runs],
        "rows": rows,
    }
    atomic_write(out / ROUTING_FILE, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return report
