"""``ftforget measure``: one k-NN forgetting measurement outside training.

Measures a checkpoint of any ftforget method (rebuilt through the method registry, so the feature is
exactly the one the callback measured during training) or a pretrained backbone, on any probe: the
ImageNet-1k probe by default, the digits miniature's, or your own ``ProbeData``. The options are those of
the typed classes the callback uses (``--knn`` is :class:`~ftforget.forgetting.config.KNNConfig`,
``--probe`` any :class:`~ftforget.data.probe.ProbeData`), and ``--config`` reads them from YAML::

    ftforget measure --ckpt_path runs/lora_r8/version_0/checkpoints/last.ckpt \\
        --probe.root /datasets/imagenet --knn.k '[20, 10, 100, 200]' --output knn.json
    ftforget measure --backbone vit_base_patch16_224.dino --checkpoint dino_vitbase16_pretrain.pth \\
        --probe.root /datasets/imagenet
    ftforget measure --ckpt_path last.ckpt --probe ftforget.data.digits.DigitsProbe --knn.batch_size 1024
    ftforget measure --run runs/lora_r8/version_0 --ckpt_path best --probe.root /datasets/imagenet

Under ``torchrun`` the bank is sharded over the processes, as in training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ftforget.backbones import build_backbone, input_size, preprocessing
from ftforget.config_files import check_config_files
from ftforget.data.digits import DigitsProbe  # noqa: F401  (importable by its short name)
from ftforget.data.imagenet import ImageNetProbe  # noqa: F401
from ftforget.data.probe import ProbeData
from ftforget.files import append_jsonl, atomic_write
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint
from ftforget.forgetting.collectives import dist_info
from ftforget.forgetting.config import KNNConfig, SubsetConfig
from ftforget.forgetting.evaluate import ProbeMeasurement, evaluate_probe
from ftforget.inference import BackboneModel, measurement_mode
from ftforget.methods.registry import load_method
from ftforget.runs import RunError, lock_run, release_runs, require_run, resolve_checkpoint


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ftforget measure",
        description=__doc__.split("\n\n")[0],
        exit_on_error=False,
        env_prefix="FTFORGET_MEASURE",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("--run", type=str | None, default=None,
                        help="a run directory: measure its checkpoint (--ckpt_path best, last or a file; default "
                        "last) and record the result in the run")  # fmt: skip
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint of an ftforget method")
    parser.add_argument(
        "--backbone", type=str | None, default=None, help="timm name of a backbone to measure"
    )
    parser.add_argument("--checkpoint", type=str | None, default=None, help="--backbone's local weights file")
    parser.add_argument("--pretrained", type=bool, default=False, help="download --backbone's timm weights")
    parser.add_argument(
        "--backbone_kwargs", type=dict[str, Any] | None, default=None, help="extra timm.create_model args"
    )
    add_probe_options(
        parser,
        probe_help="the probe: ImageNetProbe (default), DigitsProbe, ...",
        subset_help="a subset probe, drawn as the callback's subset (default: the whole probe)",
    )
    return parser


def add_probe_options(parser: ArgumentParser, probe_help: str, subset_help: str) -> None:
    """The options of a probe measurement, as the callback's (shared by ``measure`` and ``fidelity``):
    ``--probe`` (any :class:`~ftforget.data.probe.ProbeData`, ImageNet's by default), ``--knn``, ``--subset``,
    ``--device``, ``--cache_dir`` and ``--output``."""
    parser.add_subclass_arguments(ProbeData, "probe", required=True, help=probe_help)
    parser.set_defaults({"probe": {"class_path": "ftforget.data.imagenet.ImageNetProbe"}})
    parser.add_class_arguments(KNNConfig, "knn", help="k-NN and extraction settings (as the callback's knn)")
    parser.add_class_arguments(SubsetConfig, "subset", help=subset_help)
    parser.add_argument("--device", type=str | None, default=None, help="default: the local GPU, else cpu")
    parser.add_argument("--cache_dir", type=str | None, default=None, help="on-disk feature cache")
    parser.add_argument("--output", type=str | None, default=None, help="JSON file for the result")


def _check_sources(cfg: Namespace) -> Path | None:
    """Resolves ``--run`` (and its ``best``/``last``) into ``cfg.ckpt_path``; returns the run directory."""
    run_dir = None
    if cfg.run is not None:
        run_dir = require_run(Path(cfg.run).expanduser(), "--run")
        which = cfg.ckpt_path or "last"
        cfg.ckpt_path = str(resolve_checkpoint(run_dir, which) if which in ("best", "last") else Path(which))
    elif cfg.ckpt_path in ("best", "last"):
        raise RunError(f"--ckpt_path {cfg.ckpt_path}: which run? give --run RUN_DIR")
    if (cfg.ckpt_path is None) == (cfg.backbone is None):
        raise ValueError("give exactly one of --ckpt_path and --backbone")
    if cfg.ckpt_path is not None and (cfg.checkpoint or cfg.pretrained or cfg.backbone_kwargs):
        raise ValueError(
            "--checkpoint, --pretrained and --backbone_kwargs go with --backbone, not --ckpt_path"
        )
    return run_dir


def _check_output(output: str | None) -> Path | None:
    """The output path, checked before the (long) measurement so that its numbers cannot be lost."""
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise ValueError(
            f"--output {str(path)!r} is a directory; give a file name, e.g. {str(path / 'knn.json')!r}"
        )
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--output {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def _setup_distributed(device_arg: str | None) -> tuple[torch.device, bool]:
    """Joins the ``torchrun`` process group when there is one; (this process's device, whether it joined)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg in (None, "cuda")
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if device_arg not in (None, "cuda"):
        return torch.device(device_arg), joined
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), joined
    return torch.device("cpu"), joined


def measure(
    model: torch.nn.Module,
    probe: ProbeData,
    knn: KNNConfig,
    device: torch.device,
    cache: FeatureCache | None = None,
    subset: SubsetConfig | None = None,
) -> ProbeMeasurement:
    """One measurement of ``model`` (a :class:`~ftforget.inference.ProbedModel`) on ``probe`` (or on its
    ``subset`` draws); every rank calls it, all get the result."""
    size = input_size(model.feature_module)  # type: ignore[arg-type]
    if size is not None:
        probe.match_input_size(size)
    if stats := preprocessing(model.feature_module):  # type: ignore[arg-type]
        probe.match_normalization(stats["mean"], stats["std"])
    probe.setup()
    model.to(device)
    fingerprint = feature_fingerprint(model)
    with measurement_mode(model):
        return evaluate_probe(
            model.features, probe, knn, device, fingerprint=fingerprint, cache=cache, subset=subset
        )  # type: ignore[operator]


MEASURE_RESULTS = "measure_results.jsonl"


def record_in_run(run_dir: Path, ckpt: Path, report: dict) -> None:
    """Appends the result to the run's ``measure_results.jsonl`` and logs ``measure/<probe>/knn_top1_k<k>``
    (and top-5) at the checkpoint's step in the run's TensorBoard directory: beside the training curves,
    under a tag of its own, since another probe or k-NN setting is not the curve the callback measured."""
    from torch.utils.tensorboard import SummaryWriter

    step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    record = {**report, "checkpoint": ckpt.name, "step": step}
    append_jsonl(run_dir / MEASURE_RESULTS, record)
    writer = SummaryWriter(str(run_dir))
    try:
        for row in report["results"]:
            for metric in ("top1", "top5"):
                writer.add_scalar(f"measure/{report['probe']}/knn_{metric}_k{row['k']}", row[metric], step)
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    """Runs ``ftforget measure``; returns the exit status."""
    parser = build_parser()
    check_config_files(argv)  # a malformed YAML file: named, with its line
    try:
        cfg = parser.parse_args(argv)
    except Exception as err:  # jsonargparse reports bad options as ArgumentError; the message names the key
        raise ValueError(str(err).strip().replace("\n", " ")) from None
    run_dir = _check_sources(cfg)
    output = _check_output(cfg.output)
    init = parser.instantiate_classes(cfg)
    if cfg.ckpt_path is not None:
        model, source = load_method(cfg.ckpt_path), f"ckpt:{cfg.ckpt_path}"
    else:
        backbone = build_backbone(cfg.backbone, cfg.checkpoint, cfg.pretrained, **(cfg.backbone_kwargs or {}))
        model = BackboneModel(backbone)
        source = f"backbone:{cfg.backbone}" + (f":{cfg.checkpoint}" if cfg.checkpoint else "")
    device, joined = _setup_distributed(cfg.device)
    cache = FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
    subset = None if init.subset.is_full else init.subset
    result = measure(model, init.probe, init.knn, device, cache, subset)
    report = {
        "source": source, "probe": init.probe.name, "temperature": init.knn.temperature,
        "results": [{"k": k, "top1": result.top1[k], "top5": result.top5[k]} for k in init.knn.ks],
        "num_queries": result.num_queries, "num_bank": result.num_bank, "seconds": result.seconds,
        "world_size": dist_info()[1], "subset": None if subset is None else vars(subset),
    }  # fmt: skip
    if dist_info()[0] == 0:
        n = result.num_queries
        for row in report["results"]:
            # Hit counts alongside the percentages: the exact fractions logged in forgetting.jsonl.
            top1, top5 = round(row["top1"] * n), round(row["top5"] * n)
            sys.stdout.write(
                f"{source}: {init.probe.name} k-NN k={row['k']}: top-1 {100 * row['top1']:.2f}% ({top1}/{n}), "
                f"top-5 {100 * row['top5']:.2f}% ({top5}/{n})\n"
            )
        if run_dir is not None:
            lock_run(run_dir)  # one writer per run directory
            try:
                record_in_run(run_dir, Path(cfg.ckpt_path), report)
            finally:
                release_runs()
            sys.stdout.write(f"recorded in {run_dir / MEASURE_RESULTS} and its TensorBoard events\n")
        if output is not None:
            atomic_write(output, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
            sys.stdout.write(f"wrote {output}\n")
    if joined:
        dist.destroy_process_group()
    return 0
