"""``ftforget fidelity``: how faithfully a subset probe reproduces the full probe, measured on checkpoints.

A subset probe (``bank_per_class`` bank images and ``queries_per_class`` queries of every class, drawn
``draws`` times) is much cheaper than the full ImageNet-1k probe, and less faithful. This command
measures both on the same models, the step-0 backbone and a run's checkpoints (or any checkpoints, or
run directories: their last checkpoint), and reports: per model the full probe's top-1, the subset's
(mean over the draws, with their spread) and both drops from step 0; then Spearman's rank correlation of
the accuracies across the models, the largest absolute difference in accuracy and in drop, and whether
every pairwise ordering of the models is the same on both probes (the pairs that flip are listed). The
procedure to validate a subset before using it on ImageNet::

    ftforget fidelity --run runs/lora_r8/version_0 --ckpt_paths '[runs/full/version_0, runs/linear/version_0]' \\
        --probe.root /datasets/imagenet --subset.bank_per_class 100 --subset.queries_per_class 10 \\
        --subset.draws 3 --output fidelity.json

The step-0 model is rebuilt from the first run's ``config.yaml`` (its method with the pretrained weights,
before any step), or given with ``--backbone``/``--checkpoint`` as in ``ftforget measure``. The options
``--probe`` and ``--knn`` are those of ``ftforget measure``; ``--subset`` is the callback's ``subset``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jsonargparse import ActionConfigFile, ArgumentParser

from ftforget.backbones import build_backbone, input_size
from ftforget.config_files import check_config_files
from ftforget.data.digits import DigitsProbe  # noqa: F401  (importable by its short name)
from ftforget.data.imagenet import ImageNetProbe  # noqa: F401
from ftforget.data.probe import ProbeData
from ftforget.files import atomic_write
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint
from ftforget.forgetting.collectives import dist_info
from ftforget.forgetting.config import KNNConfig, SubsetConfig
from ftforget.forgetting.evaluate import ProbeMeasurement, evaluate_probe, fidelity_statistics, subset_draws
from ftforget.inference import BackboneModel, measurement_mode
from ftforget.methods.registry import load_method
from ftforget.runs import RunError, checkpoints_of, is_run_dir, require_run, resolve_checkpoint

from .measure import _check_output, _setup_distributed, add_probe_options


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ftforget fidelity",
        description=__doc__.split("\n\n")[0],
        exit_on_error=False,
        env_prefix="FTFORGET_FIDELITY",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("--run", type=str | None, default=None,
                        help="a run directory: every checkpoint in its checkpoints/ folder, and its step-0 "
                        "model rebuilt from its config.yaml")  # fmt: skip
    parser.add_argument("--ckpt_paths", type=list[str], default=[],
                        help="more checkpoints: .ckpt files, or run directories (their last checkpoint)")  # fmt: skip
    parser.add_argument("--backbone", type=str | None, default=None,
                        help="timm name of the step-0 backbone (default: rebuilt from the first run's config.yaml)")  # fmt: skip
    parser.add_argument(
        "--checkpoint",
        type=str | None,
        default=None,
        help="--backbone's local weights file (or, without --backbone, the weights the run started from, if its config's moved)",
    )
    parser.add_argument("--pretrained", type=bool, default=False, help="download --backbone's timm weights")
    parser.add_argument(
        "--backbone_kwargs", type=dict[str, Any] | None, default=None, help="extra timm.create_model args"
    )
    parser.add_argument(
        "--step0", type=bool, default=True, help="measure the step-0 model (the drops' reference)"
    )
    add_probe_options(
        parser,
        probe_help="the full probe: ImageNetProbe (default), DigitsProbe, ...",
        subset_help="the subset probe to validate (as the callback's subset)",
    )
    return parser


def checkpoint_list(run: str | None, ckpt_paths: list[str]) -> tuple[list[Path], Path | None]:
    """The checkpoints to compare, each once and in order (the run's first, by name), and the first run
    directory (for the step-0 model).

    Raises:
        RunError: ``--run`` is not a run directory, or a run directory has no last checkpoint.
        FileNotFoundError: a checkpoint does not exist.
    """
    found: list[Path] = []
    first_run = None
    if run is not None:
        first_run = require_run(Path(run).expanduser(), "--run")
        found += [first_run / "checkpoints" / name for name in checkpoints_of(first_run)]
        if not found:
            raise RunError(f"--run {run!r} has no checkpoints in its checkpoints/ folder")
    for raw in ckpt_paths:
        path = Path(raw).expanduser()
        if path.is_dir() and is_run_dir(path):
            first_run = first_run or path
            path = resolve_checkpoint(path, "last")
        elif not path.is_file():
            raise FileNotFoundError(f"--ckpt_paths: {raw!r} is neither a checkpoint file nor a run directory")
        found.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError("nothing to compare: give --run RUN_DIR and/or --ckpt_paths '[CKPT_OR_RUN, ...]'")
    return unique, first_run


def step0_model(cfg: Any, run_dir: Path | None) -> tuple[torch.nn.Module, str]:
    """The step-0 model: ``--backbone`` as in ``ftforget measure``, else the method of ``run_dir``'s
    ``config.yaml`` built as ``ftforget fit`` built it before its first step (the pretrained weights)."""
    if cfg.backbone is not None:
        backbone = build_backbone(cfg.backbone, cfg.checkpoint, cfg.pretrained, **(cfg.backbone_kwargs or {}))
        return BackboneModel(backbone), f"backbone:{cfg.backbone}"
    if run_dir is None:
        raise ValueError(
            "the step-0 model: give --backbone (and --checkpoint), or a run with --run / --ckpt_paths"
        )
    from ftforget.commands.knob import step0_cli  # the same rebuild as ftforget knob's

    return step0_cli(run_dir, cfg.checkpoint).model.eval(), f"step 0 of {run_dir}"


def measure_both(
    model: torch.nn.Module,
    probe: ProbeData,
    knn: KNNConfig,
    subset: SubsetConfig,
    draws: Any,
    device: torch.device,
    cache: FeatureCache | None,
) -> tuple[ProbeMeasurement, ProbeMeasurement]:
    """The full and the subset measurement of ``model``, with the same feature function and k-NN."""
    size = input_size(model.feature_module)  # type: ignore[arg-type]
    if size is not None:
        probe.match_input_size(size)
    probe.setup()
    model.to(device)
    fingerprint = feature_fingerprint(model)
    with measurement_mode(model):
        full = evaluate_probe(model.features, probe, knn, device, fingerprint, cache)  # type: ignore[arg-type]
        part = evaluate_probe(
            model.features,
            probe,
            knn,
            device,
            fingerprint,
            cache,
            subset=subset,
            draws=draws,  # type: ignore[arg-type]
        )
    return full, part


def _step_of(ckpt: Path) -> int | None:
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    return int(state["global_step"]) if "global_step" in state else None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def main(argv: list[str]) -> int:
    """Runs ``ftforget fidelity``; returns the exit status."""
    parser = build_parser()
    check_config_files(argv)
    try:
        cfg = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's errors name the key
        raise ValueError(str(err).strip().replace("\n", " ")) from None
    checkpoints, first_run = checkpoint_list(cfg.run, cfg.ckpt_paths)
    output = _check_output(cfg.output)
    init = parser.instantiate_classes(cfg)
    subset: SubsetConfig = init.subset
    if subset.is_full:
        raise ValueError(
            "--subset: give subset.bank_per_class and/or subset.queries_per_class (the subset to validate)"
        )
    models: list[tuple[str, int | None, Any]] = []
    if cfg.step0:
        model, source = step0_model(cfg, first_run)
        models.append((source, 0, lambda m=model: m))
    for ckpt in checkpoints:
        models.append((str(ckpt), _step_of(ckpt), lambda c=ckpt: load_method(c)))
    device, joined = _setup_distributed(cfg.device)
    cache = FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
    probe: ProbeData = init.probe
    knn: KNNConfig = init.knn
    draws = None
    rows = []
    for name, step, load in models:
        model = load()
        if draws is None:
            size = input_size(model.feature_module)
            if size is not None:
                probe.match_input_size(size)
            probe.setup()
            draws = subset_draws(probe, subset)
        full, part = measure_both(model, probe, knn, subset, draws, device, cache)
        rows.append({
            "model": name, "step": step,
            "full": {k: full.top1[k] for k in knn.ks}, "subset": {k: part.top1[k] for k in knn.ks},
            "subset_spread": {k: part.top1_spread[k] for k in knn.ks},
            "subset_draws": [d["top1"] for d in part.draws],
            "full_ci": full.top1_ci, "subset_ci": part.top1_ci,
            "full_seconds": full.seconds, "subset_seconds": part.seconds,
            "full_images": full.num_images, "subset_images": part.num_images,
        })  # fmt: skip
    names = [r["model"] for r in rows]
    reference = 0 if cfg.step0 else None
    per_k = {
        k: fidelity_statistics(names, [r["full"][k] for r in rows], [r["subset"][k] for r in rows], reference)
        for k in knn.ks
    }
    report = {
        "probe": probe.name, "subset": vars(subset) | {"seeds": subset.seeds},
        "knn": {"k": knn.ks, "temperature": knn.temperature}, "reference": names[0] if cfg.step0 else None,
        "models": rows, "fidelity": per_k,
        "full_images": rows[0]["full_images"], "subset_images": rows[0]["subset_images"],
    }  # fmt: skip
    if dist_info()[0] == 0:
        k = knn.ks[0]
        out = [f"fidelity of the subset {subset.signature()} against the full {probe.name} probe (k={k}):"]
        out.append("| model | step | full top-1 | subset top-1 (± spread) | full drop | subset drop |")
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            f, s = r["full"][k], r["subset"][k]
            spread = r["subset_spread"][k]
            drops = ("—", "—")
            if reference is not None:
                drops = (_pct(rows[0]["full"][k] - f), _pct(rows[0]["subset"][k] - s))
            cell = _pct(s) + ("" if spread is None else f" ± {_pct(spread)}")
            out.append(f"| {r['model']} | {r['step']} | {_pct(f)} | {cell} | {drops[0]} | {drops[1]} |")
        stats = per_k[k]
        rho = "—" if stats["spearman"] is None else f"{stats['spearman']:.4f}"
        out.append(
            f"Spearman rank correlation {rho}; largest |accuracy difference| {_pct(stats['max_abs_acc_diff'])} "
            f"points; largest |drop difference| {_pct(stats['max_abs_drop_diff'])} points; pairwise orderings "
            + (
                "all preserved"
                if stats["orderings_preserved"]
                else f"{len(stats['reversed_pairs'])} of {stats['pairs']} reversed: {stats['reversed_pairs']}"
            )  # fmt: skip
        )
        out.append(
            f"images per measurement: full {report['full_images']}, subset {report['subset_images']} "
            f"({report['subset_images'] / max(1, report['full_images']):.3f} of the full probe)"
        )
        sys.stdout.write("\n".join(out) + "\n")
        if output is not None:
            text = json.dumps(report, indent=2) + "\n"
            atomic_write(output, lambda f: f.write(text.encode()))
            sys.stdout.write(f"wrote {output}\n")
    if joined:
        dist.destroy_process_group()
    return 0
