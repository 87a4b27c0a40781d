"""The forgetting callback: k-NN accuracy on the old domain at chosen optimizer steps, during training.

Step ``s`` is measured once ``s`` optimizer steps have been taken: step 0 before the first batch, later
steps right after their optimizer step (before that step's checkpoint is written, so the checkpoint
already holds the measurement). A measurement leaves no trace on training: eval mode, ``no_grad``, then
the exact prior train flags and random states (:func:`~ftforget.inference.measurement_mode`).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import Subset

from ftforget.backbones import input_size, preprocessing
from ftforget.data.probe import ProbeData, SubsetDraws, positions_by_class
from ftforget.files import atomic_write
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint
from ftforget.forgetting.collectives import all_ranks_agree, all_reduce_sum, dist_info
from ftforget.forgetting.config import DEFAULT_EVAL_STEPS, KNNConfig, SubsetConfig, to_dtype
from ftforget.forgetting.evaluate import evaluate_probe, loader_top1, subset_draws
from ftforget.forgetting.features import extract_features
from ftforget.forgetting.prefix import DEFAULT_PREFIX_CACHE_GB, PrefixReuse
from ftforget.inference import measurement_mode, require_probed
from ftforget.stats import bootstrap_drop_ci, paired_counts, unpack_hits

log = logging.getLogger(__name__)

#: bank : queries per class of a budget-sized subset when ``subset`` gives no shape (the issue's 100 : 10)
DEFAULT_BANK_TO_QUERIES = 10.0
#: probe images timed at step 0 to estimate the per-image cost of a measurement (``probe_budget``)
CALIBRATION_IMAGES = 256
#: training steps after which the budget's estimate is checked against measured timings (logged)
BUDGET_CHECK_STEPS = 10


class ForgettingCallback(L.Callback):
    """Measures DINO's weighted k-NN accuracy on a probe (ImageNet-1k) at fixed global steps.

    Logs ``forgetting/knn_top1``, ``forgetting/knn_top5`` (other k: ``..._k<k>``), ``forgetting/drop_abs``,
    ``forgetting/drop_rel`` and ``forgetting/new_task_val_acc1`` against the global step, and appends one
    line per (step, k) to ``<log_dir>/forgetting.jsonl``. Works under DDP: the bank is sharded over ranks.

    Args:
        eval_at_steps: global steps to measure at (None: 0, 1, 2, 5, ..., 10000); step 0 is always measured,
            as the reference of the drops.
        every_n_steps: also measure every this many steps.
        probe: the probe; None takes ``trainer.datamodule.probe``.
        knn: the k-NN and extraction settings (:class:`~ftforget.forgetting.config.KNNConfig`, the same
            object ``ftforget measure`` takes); None: its defaults.
        new_task_val: also measure top-1 on ``trainer.datamodule.val_dataloader()`` at the same steps.
        cache_dir: on-disk cache of features keyed by the feature weights' hash and the probe
            (``probe.cache_key()``); reuses e.g. the pretrained backbone's step-0 features across runs.
        reuse_unchanged: when the feature weights are bit-identical to the last measurement's (a linear
            probe's backbone), reuse its k-NN result instead of recomputing it.
        filename: name of the measurement file in the run directory.
        subset: measure a subset probe instead of the whole one
            (:class:`~ftforget.forgetting.config.SubsetConfig`: ``bank_per_class`` and ``queries_per_class``
            per draw, ``draws`` draws from ``seed``); every line then also carries the spread of top-1
            over the draws (``top1_spread``) and each draw's top-1 (``draws``).
        probe_budget: size the subset so that the measurements take about this share of the training
            time (e.g. 0.2), chosen at the first measurement from measured per-image costs and logged
            (:func:`choose_subset`); ``subset`` then gives only the shape (the bank : queries ratio and
            the draws), 10 : 1 and one draw by default. None: measure ``subset`` (or the whole probe).
        prefix_cache_gb: GiB of probe tokens kept after a method's frozen blocks (top-k, Block Expansion,
            linear probe), so later measurements run only the rest (:mod:`ftforget.forgetting.prefix`).
    """

    def __init__(
        self,
        eval_at_steps: list[int] | None = None,
        every_n_steps: int | None = None,
        probe: ProbeData | None = None,
        knn: KNNConfig | None = None,
        new_task_val: bool = True,
        cache_dir: str | None = None,
        reuse_unchanged: bool = True,
        filename: str = "forgetting.jsonl",
        subset: SubsetConfig | None = None,
        probe_budget: float | None = None,
        prefix_cache_gb: float = DEFAULT_PREFIX_CACHE_GB,
    ) -> None:
        steps = list(DEFAULT_EVAL_STEPS if eval_at_steps is None else eval_at_steps)
        if any(s < 0 for s in steps):
            raise ValueError(f"eval_at_steps must be >= 0, got {steps}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.eval_at_steps = sorted({0, *steps})
        self._explicit_steps = eval_at_steps is not None  # the default list runs to 10000: no warning
        self.every_n_steps = every_n_steps
        self.probe = probe
        self.config = knn if knn is not None else KNNConfig()
        self.new_task_val = new_task_val
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        self.reuse_unchanged = reuse_unchanged
        self.filename = filename
        if probe_budget is not None and not 0 < probe_budget:
            raise ValueError(
                f"probe_budget must be > 0 (a share of the training time, e.g. 0.2), got {probe_budget}"
            )
        self.subset = subset
        self.probe_budget = None if probe_budget is None else float(probe_budget)
        self._draws: SubsetDraws | None = None
        self._draws_signature = ""
        self.prefix = PrefixReuse(prefix_cache_gb)
        self._probe: ProbeData | None = None
        self._reuse_key = ""
        self._path: Path | None = None
        self._reset_state()

    # ------------------------------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.baseline: dict[int, float] = {}
        # the step-0 per-query top-1 hit vectors (packed, ftforget.stats.pack_hits) and their query count
        self.baseline_hits: dict[int, str] = {}
        self.baseline_queries = 0
        self._last: tuple[str, dict[str, Any]] | None = None  # (fingerprint, measurement) of the last one
        # the subset a probe_budget chose (a SubsetConfig's fields; {} for the whole probe), None: not yet
        self.chosen_subset: dict[str, Any] | None = None
        self.budget: dict[str, Any] = {}  # the budget's estimates and the timings behind them
        self._elapsed_before = 0.0  # wall-clock seconds of the fit before this process's session
        self._started: float | None = None
        self.probe_seconds_total = 0.0  # wall-clock seconds of all measurements so far
        self._step_timer: tuple[int, float, float] | None = None  # (step, time, probe total) at a batch end

    @property
    def measured_steps(self) -> set[int]:
        return {int(r["step"]) for r in self.records}

    def state_dict(self) -> dict[str, Any]:
        # Plain python types only: checkpoints may be loaded with ``weights_only=True``.
        return {
            "records": [dict(r) for r in self.records],
            "baseline": dict(self.baseline),
            "baseline_hits": dict(self.baseline_hits),
            "baseline_queries": self.baseline_queries,
            "last": list(self._last) if self._last else None,
            "chosen_subset": self.chosen_subset,
            "budget": dict(self.budget),
            "elapsed": self.elapsed(),
            "probe_seconds_total": self.probe_seconds_total,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.baseline = {int(k): float(v) for k, v in state_dict.get("baseline", {}).items()}
        self.baseline_hits = {int(k): str(v) for k, v in state_dict.get("baseline_hits", {}).items()}
        self.baseline_queries = int(state_dict.get("baseline_queries", 0))
        last = state_dict.get("last")
        self._last = (last[0], last[1]) if last else None
        chosen = state_dict.get("chosen_subset")
        self.chosen_subset = dict(chosen) if chosen is not None else None
        self.budget = dict(state_dict.get("budget", {}))
        self._elapsed_before = float(state_dict.get("elapsed", 0.0))
        self.probe_seconds_total = float(state_dict.get("probe_seconds_total", 0.0))

    def elapsed(self) -> float:
        """Wall-clock seconds of the fit so far (training and measurements), over resumed sessions too."""
        return self._elapsed_before + (0.0 if self._started is None else time.perf_counter() - self._started)

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolves and checks the probe before training starts (bad paths fail here, by name)."""
        if stage != "fit":
            return
        self._reset_state()  # a resumed fit gets its state back from the checkpoint after setup
        self.check_inputs(trainer.datamodule, pl_module, stage)
        late = [s for s in self.eval_at_steps if 0 <= trainer.max_steps < s]
        if late and self._explicit_steps:
            rank_zero_warn(
                f"ForgettingCallback: eval_at_steps {late} beyond trainer.max_steps {trainer.max_steps}"
            )

    def check_inputs(
        self, datamodule: L.LightningDataModule | None, pl_module: L.LightningModule, stage: str
    ) -> None:
        """Resolves and checks the probe of a ``stage`` (only ``fit`` measures); idempotent.

        ``ftforget fit`` calls it before the trainer starts, so that a bad probe fails before anything is
        written to the run directory; :meth:`setup` calls it again for trainers used from Python.
        """
        if stage != "fit":
            return
        probe = self.probe if self.probe is not None else getattr(datamodule, "probe", None)
        if probe is None:
            raise ValueError(
                "ForgettingCallback has no probe: pass probe=... to the callback or use a data module with a "
                "`probe` (e.g. an ImageNetProbe)"
            )
        if not isinstance(probe, ProbeData):
            raise TypeError(f"ForgettingCallback: probe must be a ProbeData, got {type(probe).__name__}")
        feature_module = require_probed(pl_module, "ForgettingCallback").feature_module
        size = input_size(feature_module)
        if size is not None:
            probe.match_input_size(size)
        if stats := preprocessing(feature_module):
            probe.match_normalization(stats["mean"], stats["std"])
        probe.setup()
        n_bank = len(probe.bank_dataset())  # type: ignore[arg-type]
        if max(self.config.ks) > n_bank:
            raise ValueError(
                f"ForgettingCallback: knn.k={max(self.config.ks)} exceeds the probe's bank size {n_bank}"
            )
        if self.new_task_val and (datamodule is None or not is_overridden("val_dataloader", datamodule)):
            raise ValueError(
                "ForgettingCallback(new_task_val=True) needs trainer.datamodule.val_dataloader(); "
                "set new_task_val=False to measure the probe only"
            )
        self._probe = probe
        self._draws = None
        if self.subset is not None and self.probe_budget is None and not self.subset.is_full:
            draws = self._subset_draws(self.subset)
            smallest = min(len(d.bank) for d in draws.draws)
            if max(self.config.ks) > smallest:
                raise ValueError(
                    f"ForgettingCallback: knn.k={max(self.config.ks)} exceeds the subset probe's bank of "
                    f"{smallest} images (subset.bank_per_class={self.subset.bank_per_class})"
                )
        # What a reused result must match besides the weights (a resumed run may change k or the probe).
        self._reuse_key = json.dumps([repr(self.config), probe.name, probe.cache_key(), n_bank])

    # ----------------------------------------------------------------------------------------- subset
    def current_subset(self) -> SubsetConfig | None:
        """The subset measured: the one ``probe_budget`` chose (None before it chose, or if it chose the
        whole probe), else ``subset``."""
        if self.chosen_subset is not None:
            return SubsetConfig(**self.chosen_subset) if self.chosen_subset else None
        return None if self.probe_budget is not None else self.subset

    def _subset_draws(self, subset: SubsetConfig) -> SubsetDraws:
        """``subset``'s draws on the probe, built once per subset."""
        assert self._probe is not None, "check_inputs resolves the probe"
        if self._draws is None or self._draws_signature != subset.signature():
            self._draws = subset_draws(self._probe, subset)
            self._draws_signature = subset.signature()
        return self._draws

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self._path = Path(log_dir or trainer.default_root_dir) / self.filename
        if trainer.is_global_zero:
            # Rewrite from the (restored) state: lines a killed run wrote after its last checkpoint vanish,
            # and a resumed run logging to a new directory still gets the whole curve.
            lines = "".join(json.dumps(r) + "\n" for r in self.records).encode()
            atomic_write(self._path, lambda f: f.write(lines))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_measure(trainer, pl_module, batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_measure(trainer, pl_module, batch)
        if self.budget and "measured_step_seconds" not in self.budget:
            self._check_budget(trainer)

    # ------------------------------------------------------------------------------------ measurement
    def is_due(self, step: int) -> bool:
        """Whether ``step`` is scheduled and not yet measured (identical on every rank)."""
        scheduled = step in self.eval_at_steps or (
            self.every_n_steps is not None and step % self.every_n_steps == 0
        )
        return scheduled and step not in self.measured_steps

    def _maybe_measure(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any = None) -> None:
        step = trainer.global_step
        if not self.is_due(step):
            return
        if step > 0 and not self.baseline:
            rank_zero_info(
                f"ForgettingCallback: no step-0 measurement in this run; drops at step {step} are null"
            )
        if self.probe_budget is not None and self.chosen_subset is None:
            self._size_subset(trainer, pl_module, batch)
        start = time.perf_counter()
        reuse = self.prefix.active(pl_module, self._probe.cache_key() if self._probe else "")
        with measurement_mode(pl_module), reuse:
            result = self._knn(pl_module)
            new_acc = self._new_task_accuracy(trainer, pl_module) if self.new_task_val else None
        seconds = time.perf_counter() - start
        self.probe_seconds_total += seconds
        records = self._records(step, trainer.current_epoch, result, new_acc, seconds)
        self.records.extend(records)
        if trainer.is_global_zero:
            self._write(trainer, records)

    def _knn(self, pl_module: L.LightningModule) -> dict[str, Any]:
        assert self._probe is not None, "setup() resolves the probe"
        subset = self.current_subset()
        reuse_key = f"{self._reuse_key}|{subset.signature() if subset else ''}"
        fingerprint = feature_fingerprint(pl_module) if (self.reuse_unchanged or self.cache) else None
        if fingerprint is not None and self.reuse_unchanged:
            # All ranks must take the same branch, or their collectives would no longer match.
            same = self._last is not None and self._last[0] == f"{fingerprint}|{reuse_key}"
            if all_ranks_agree(same, pl_module.device):
                return {**self._last[1], "seconds": 0.0, "images_per_s": 0.0, "num_images": 0}  # type: ignore[index]
        draws = None if subset is None or subset.is_full else self._subset_draws(subset)
        result = evaluate_probe(
            pl_module.features,
            self._probe,
            self.config,
            pl_module.device,
            fingerprint=fingerprint,
            cache=self.cache,
            subset=subset,
            draws=draws,
        ).as_dict()
        if fingerprint is not None:
            self._last = (f"{fingerprint}|{reuse_key}", dict(result))
        return result

    # ------------------------------------------------------------------------------------ probe budget
    def _size_subset(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Chooses the subset from ``probe_budget`` and two timings taken now, identical on every rank:
        the feature extraction of up to :data:`CALIBRATION_IMAGES` probe images (seconds per image, as a
        measurement pays them, data loading included) and a forward and backward pass of this training
        batch (seconds per training step, without the optimizer's update); see :func:`choose_subset`."""
        assert self._probe is not None and self.probe_budget is not None
        device = pl_module.device
        image_seconds = self._time_probe_images(pl_module)
        step_seconds = self._time_training_step(pl_module, batch)
        image_seconds, step_seconds = (
            v / dist_info()[1] for v in all_reduce_sum([image_seconds, step_seconds], device)
        )  # every rank chooses from the same numbers
        total_steps = int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)
        measurements = sum(self._scheduled(s) for s in range(0, total_steps + 1))
        shape = self.subset or SubsetConfig()
        chosen, predicted = choose_subset(
            self.probe_budget,
            step_seconds * total_steps,
            image_seconds * measurements / dist_info()[1],  # the ranks share every measurement's images
            self._probe.bank_labels(),
            self._probe.query_labels(),
            shape,
            max(self.config.ks),
        )
        self.chosen_subset = {} if chosen is None else asdict(chosen)
        self.budget = {
            "probe_budget": self.probe_budget, "image_seconds": image_seconds, "step_seconds": step_seconds,
            "steps": total_steps, "measurements": measurements, "predicted_share": predicted,
        }  # fmt: skip
        what = "the whole probe" if chosen is None else (
            f"bank_per_class={chosen.bank_per_class}, queries_per_class={chosen.queries_per_class}, "
            f"draws={chosen.draws} (seeds {chosen.seeds[0]}..{chosen.seeds[-1]})"
        )  # fmt: skip
        rank_zero_info(
            f"ForgettingCallback: probe_budget {self.probe_budget:g}: a probe image costs "
            f"{1000 * image_seconds:.3f} ms, a training step {1000 * step_seconds:.1f} ms (forward and backward "
            f"of the step-0 batch), {measurements} measurements in {total_steps} steps: chose {what}, "
            f"predicted probe time {predicted:.3f} of the training time"
        )
        if predicted > self.probe_budget * 1.0001:
            rank_zero_warn(
                f"ForgettingCallback: probe_budget {self.probe_budget:g} cannot be met: the smallest subset "
                f"that keeps k={max(self.config.ks)} neighbours is predicted at {predicted:.3f} of the training time"
            )

    def _scheduled(self, step: int) -> bool:
        return step in self.eval_at_steps or (
            self.every_n_steps is not None and step % self.every_n_steps == 0
        )

    def _time_probe_images(self, pl_module: L.LightningModule) -> float:
        """Seconds per image of this rank's extraction of the probe's first bank images."""
        assert self._probe is not None
        bank = self._probe.bank_dataset()
        n = min(CALIBRATION_IMAGES, len(bank))  # type: ignore[arg-type]
        sample, _ = self._probe.subset_datasets(list(range(n)), [0])
        cfg = self.config
        seconds = 0.0
        with measurement_mode(pl_module):
            for timed in (False, True):  # the first pass warms up (allocations, kernels), the second is timed
                start = time.perf_counter()
                extract_features(
                    pl_module.features, sample if timed else Subset(sample, range(min(n, cfg.batch_size))),
                    cfg.batch_size, cfg.num_workers, pl_module.device, to_dtype(cfg.bank_dtype),  # type: ignore[arg-type]
                    to_dtype(cfg.autocast_dtype), desc="probe budget: timing",
                )  # fmt: skip
                _synchronize(pl_module.device)
                seconds = time.perf_counter() - start
        return seconds / max(1, len(sample) // dist_info()[1])  # type: ignore[arg-type]

    def _time_training_step(self, pl_module: L.LightningModule, batch: Any) -> float:
        """Seconds of a forward and backward pass of ``batch`` through ``pl_module`` in train mode, leaving
        no trace: gradients go to ``torch.autograd.grad`` (no ``.grad`` is touched, no DDP hook runs) and
        the random states are restored."""
        if batch is None:
            raise RuntimeError("ForgettingCallback: probe_budget needs a training batch to time a step")
        x, y = batch[0].to(pl_module.device), batch[1].to(pl_module.device)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        seconds = []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for _ in range(2):  # the first pass warms up, the second is timed
                start = time.perf_counter()
                loss = F.cross_entropy(pl_module(x), y)
                if params and loss.requires_grad:
                    torch.autograd.grad(loss, params, allow_unused=True)
                _synchronize(pl_module.device)
                seconds.append(time.perf_counter() - start)
        return seconds[-1]

    def _check_budget(self, trainer: L.Trainer) -> None:
        """After :data:`BUDGET_CHECK_STEPS` training steps, logs the step time measured over them (the
        time between the first and the last batch end, less the measurements in between) against the
        step-0 estimate, and the probe share they predict with the step-0 measurement's real cost."""
        now, step = time.perf_counter(), trainer.global_step
        if self._step_timer is None:
            self._step_timer = (step, now, self.probe_seconds_total)
            return
        first, then, probe_then = self._step_timer
        if step - first < BUDGET_CHECK_STEPS and step < self.budget["steps"]:
            return
        step_seconds = (now - then - (self.probe_seconds_total - probe_then)) / max(1, step - first)
        head = [r for r in self.records if r["k"] == self.config.ks[0]]
        measure = statistics.fmean([r["seconds"] for r in head]) if head else 0.0
        share = measure * self.budget["measurements"] / max(1e-12, step_seconds * self.budget["steps"])
        self.budget |= {"measured_step_seconds": step_seconds, "measured_share": share}
        rank_zero_info(
            f"ForgettingCallback: probe_budget check after steps {first + 1}-{step}: a training step took "
            f"{1000 * step_seconds:.1f} ms (estimated {1000 * self.budget['step_seconds']:.1f} ms), a measurement "
            f"{measure:.2f} s: the probe is on course for {share:.3f} of the training time "
            f"(budget {self.probe_budget:g}, predicted {self.budget['predicted_share']:.3f})"
        )

    def _new_task_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Top-1 on the new task's val set, each sample counted once over the ranks (None if it is empty)."""
        loader = trainer.datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        dtype = to_dtype(self.config.autocast_dtype)
        offset = int(getattr(pl_module, "hparams", {}).get("label_offset", 0))  # a class-incremental head
        return loader_top1(pl_module, loader, pl_module.device, dtype, self.config.batch_size, offset)

    def _records(
        self, step: int, epoch: int, result: dict[str, Any], new_acc: float | None, seconds: float
    ) -> list[dict[str, Any]]:
        """One line per k; ``top1_ci`` is top-1's bootstrap 95% interval over the queries and, after step
        0, ``drop_abs_ci`` the paired one of ``drop_abs`` (the same queries resampled at step 0 and now,
        :func:`~ftforget.stats.bootstrap_drop_ci`); either is None where its inputs are missing.

        The cost: ``seconds`` is the whole pause (probe and new-task accuracy), ``probe_seconds`` the
        probe's part, ``num_images`` the images it passed through the network (0 when it reused the last
        result), ``images_per_s`` their rate; ``elapsed`` the fit's wall-clock so far (resumed sessions
        added up) and ``probe_seconds_total`` the pauses' sum so far, whose ratio the report shows.
        A subset probe adds ``subset`` (its settings), ``top1_spread`` (sample std of top-1 over the
        draws, None for one) and ``draws`` (each draw's seed and top-1)."""
        n = int(result["num_queries"])
        hits = {int(k): str(v) for k, v in (result.get("top1_hits") or {}).items()}
        if step == 0:
            self.baseline = {int(k): float(v) for k, v in result["top1"].items()}
            self.baseline_hits, self.baseline_queries = hits, n
        cis = {int(k): v for k, v in (result.get("top1_ci") or {}).items()}
        spread = {int(k): v for k, v in (result.get("top1_spread") or {}).items()}
        subset = self.current_subset()
        elapsed = self.elapsed()
        rows = []
        for k in self.config.ks:
            top1 = float(result["top1"][k])
            base = self.baseline.get(k)
            drop = None if base is None else base - top1
            drop_ci = None
            if step > 0 and drop is not None and k in hits and k in self.baseline_hits \
                    and self.baseline_queries == n:  # fmt: skip
                lost, gained, _ = paired_counts(
                    unpack_hits(self.baseline_hits[k], n), unpack_hits(hits[k], n)
                )
                drop_ci = list(bootstrap_drop_ci(lost, gained, n))
            rows.append({
                "step": step, "epoch": epoch, "probe": self._probe.name, "k": k,  # type: ignore[union-attr]
                "temperature": self.config.temperature, "top1": top1, "top5": float(result["top5"][k]),
                "drop_abs": drop, "drop_rel": None if drop is None or not base else drop / base,
                "new_task_val_acc1": new_acc, "num_queries": n,
                "num_bank": int(result["num_bank"]), "seconds": seconds,
                "top1_ci": [float(x) for x in cis[k]] if k in cis else None, "drop_abs_ci": drop_ci,
                "probe_seconds": float(result.get("seconds", 0.0)), "num_images": int(result.get("num_images", 0)),
                "images_per_s": float(result.get("images_per_s", 0.0)), "elapsed": elapsed,
                "probe_seconds_total": self.probe_seconds_total,
            })  # fmt: skip
            if subset is not None:
                rows[-1] |= {
                    "subset": asdict(subset), "top1_spread": spread.get(k),
                    "draws": [{"seed": d["seed"], "top1": float(_by_k(d["top1"], k))} for d in result.get("draws", [])],
                }  # fmt: skip
        return rows

    def _write(self, trainer: L.Trainer, records: list[dict[str, Any]]) -> None:
        """Rank 0 only: the measurement file and the loggers."""
        assert self._path is not None, "on_train_start sets the path"
        with open(self._path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        head = records[0]
        metrics = {"forgetting/knn_top1": head["top1"], "forgetting/knn_top5": head["top5"]}
        for r in records[1:]:
            metrics[f"forgetting/knn_top1_k{r['k']}"] = r["top1"]
            metrics[f"forgetting/knn_top5_k{r['k']}"] = r["top5"]
        for name in ("drop_abs", "drop_rel", "new_task_val_acc1", "top1_spread"):
            if head.get(name) is not None:
                metrics[f"forgetting/{name}"] = head[name]
        metrics["forgetting/seconds"] = head["seconds"]
        metrics["forgetting/probe_seconds"] = head["probe_seconds"]
        metrics["forgetting/probe_images_per_s"] = head["images_per_s"]
        if head["elapsed"] > 0:
            metrics["forgetting/probe_share"] = head["probe_seconds_total"] / head["elapsed"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=head["step"])
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()  # measurements are rare and costly: do not lose one to a crash
        rank_zero_info(
            f"forgetting @ step {head['step']}: {self._probe.name} k-NN top-1 {head['top1']:.4f} "  # type: ignore[union-attr]
            f"(k={head['k']}, {head['seconds']:.1f}s, "
            + (f"{head['images_per_s']:.0f} images/s)" if head["num_images"] else "reused the last result)")
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def union_size(class_sizes: Sequence[int], n: int | None, draws: int) -> int:
    """Distinct images that ``draws`` consecutive-seed draws of ``n`` per class use (all for None):
    ``min(size, draws * min(n, size))`` per class (:func:`~ftforget.data.probe.draw_per_class`)."""
    if n is None:
        return sum(class_sizes)
    return sum(min(size, draws * min(n, size)) for size in class_sizes)


def choose_subset(
    budget: float,
    train_seconds: float,
    probe_image_seconds: float,
    bank_labels: Sequence[int],
    query_labels: Sequence[int],
    shape: SubsetConfig,
    k: int,
) -> tuple[SubsetConfig | None, float]:
    """The largest subset whose measurements are predicted to take at most ``budget`` of the training time.

    The estimate: a measurement costs ``image_seconds`` per image it extracts (the union of its draws,
    :func:`union_size`; the k-NN of a subset is small beside the extraction and is left out), and the
    run makes the same measurements throughout, so the probe's share of the training time is
    ``probe_image_seconds * images / train_seconds``.

    Args:
        budget: the target share of the training time (e.g. 0.2).
        train_seconds: the predicted training time of the run (seconds per step times steps).
        probe_image_seconds: the predicted seconds, over all measurements of the run, of one probe image
            (seconds per image times measurements, divided by the processes that share them).
        bank_labels: the full probe's bank labels.
        query_labels: its query labels.
        shape: the draws and the bank : queries ratio to keep (``bank_per_class / queries_per_class``;
            :data:`DEFAULT_BANK_TO_QUERIES` where either is None).
        k: the largest k: every draw's bank holds at least ``k`` images, budget or not.

    Returns:
        ``(subset, predicted share)``: None for the whole probe, when it fits the budget.
    """
    bank_sizes = [len(p) for p in positions_by_class(bank_labels).values()]
    query_sizes = [len(p) for p in positions_by_class(query_labels).values()]

    def share(images: int) -> float:
        return probe_image_seconds * images / max(train_seconds, 1e-12)

    full = share(sum(bank_sizes) + sum(query_sizes))
    if full <= budget:
        return None, full
    ratio = DEFAULT_BANK_TO_QUERIES
    if shape.bank_per_class is not None and shape.queries_per_class is not None:
        ratio = shape.bank_per_class / shape.queries_per_class

    def sizes(q: int) -> tuple[int, int]:
        return max(1, round(ratio * q)), q

    def cost(q: int) -> float:
        n, q = sizes(q)
        return share(union_size(bank_sizes, n, shape.draws) + union_size(query_sizes, q, shape.draws))

    def bank_ok(q: int) -> bool:
        return union_size(bank_sizes, sizes(q)[0], 1) >= k

    top = max(max(query_sizes), math.ceil(max(bank_sizes) / ratio))
    q = 1
    while q < top and cost(q + 1) <= budget:  # cost grows with q: the first q past the budget stops it
        q += 1
    while not bank_ok(q) and q < top:
        q += 1  # fewer than k neighbours is no measurement: exceed the budget rather
    n, q = sizes(q)
    return SubsetConfig(n, q, shape.draws, shape.seed), cost(q)


def _by_k(values: dict[Any, Any], k: int) -> Any:
    """``values[k]`` of a dict whose keys are ints, or strings after a JSON round trip."""
    return values[k] if k in values else values[str(k)]
