"""The forgetting callback: k-NN accuracy on the old domain at chosen optimizer steps, during training.

Step ``s`` is measured once ``s`` optimizer steps have been taken: step 0 before the first batch, later
steps right after their optimizer step (before that step's checkpoint is written, so the checkpoint
already holds the measurement). A measurement leaves no trace on training: eval mode, ``no_grad``, then
the exact prior train flags and random states (:func:`~ftforget.inference.measurement_mode`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from ftforget.backbones import input_size
from ftforget.data.probe import ProbeData
from ftforget.files import atomic_write
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint
from ftforget.forgetting.collectives import all_ranks_agree, all_reduce_sum
from ftforget.forgetting.config import DEFAULT_EVAL_STEPS, KNNConfig, to_dtype
from ftforget.forgetting.evaluate import evaluate_probe
from ftforget.forgetting.features import sharded_loader
from ftforget.forgetting.prefix import DEFAULT_PREFIX_CACHE_GB, PrefixReuse
from ftforget.inference import autocast_context, measurement_mode, require_probed
from ftforget.stats import bootstrap_drop_ci, paired_counts, unpack_hits


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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state_dict.get("records", [])]
        self.baseline = {int(k): float(v) for k, v in state_dict.get("baseline", {}).items()}
        self.baseline_hits = {int(k): str(v) for k, v in state_dict.get("baseline_hits", {}).items()}
        self.baseline_queries = int(state_dict.get("baseline_queries", 0))
        last = state_dict.get("last")
        self._last = (last[0], last[1]) if last else None

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
        size = input_size(require_probed(pl_module, "ForgettingCallback").feature_module)
        if size is not None:
            probe.match_input_size(size)
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
        # What a reused result must match besides the weights (a resumed run may change k or the probe).
        self._reuse_key = json.dumps([repr(self.config), probe.name, probe.cache_key(), n_bank])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_measure(trainer, pl_module)

    # ------------------------------------------------------------------------------------ measurement
    def is_due(self, step: int) -> bool:
        """Whether ``step`` is scheduled and not yet measured (identical on every rank)."""
        scheduled = step in self.eval_at_steps or (
            self.every_n_steps is not None and step % self.every_n_steps == 0
        )
        return scheduled and step not in self.measured_steps

    def _maybe_measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.is_due(step):
            return
        if step > 0 and not self.baseline:
            rank_zero_info(
                f"ForgettingCallback: no step-0 measurement in this run; drops at step {step} are null"
            )
        start = time.perf_counter()
        reuse = self.prefix.active(pl_module, self._probe.cache_key() if self._probe else "")
        with measurement_mode(pl_module), reuse:
            result = self._knn(pl_module)
            new_acc = self._new_task_accuracy(trainer, pl_module) if self.new_task_val else None
        records = self._records(step, trainer.current_epoch, result, new_acc, time.perf_counter() - start)
        self.records.extend(records)
        if trainer.is_global_zero:
            self._write(trainer, records)

    def _knn(self, pl_module: L.LightningModule) -> dict[str, Any]:
        assert self._probe is not None, "setup() resolves the probe"
        fingerprint = feature_fingerprint(pl_module) if (self.reuse_unchanged or self.cache) else None
        if fingerprint is not None and self.reuse_unchanged:
            # All ranks must take the same branch, or their collectives would no longer match.
            same = self._last is not None and self._last[0] == f"{fingerprint}|{self._reuse_key}"
            if all_ranks_agree(same, pl_module.device):
                return dict(self._last[1])  # type: ignore[index]
        result = evaluate_probe(
            pl_module.features,
            self._probe,
            self.config,
            pl_module.device,
            fingerprint=fingerprint,
            cache=self.cache,
        ).as_dict()
        if fingerprint is not None:
            self._last = (f"{fingerprint}|{self._reuse_key}", dict(result))
        return result

    def _new_task_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Top-1 on the new task's val set, each sample counted once over the ranks (None if it is empty)."""
        loader = trainer.datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        device = pl_module.device
        sharded = sharded_loader(
            loader.dataset,
            loader.batch_size or self.config.batch_size,
            loader.num_workers,
            device,
            collate_fn=loader.collate_fn,
        )
        correct, total = 0, 0
        for batch in sharded:
            x, y = batch[0].to(device), batch[1].to(device)
            with autocast_context(device, to_dtype(self.config.autocast_dtype)):
                logits = pl_module(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
        correct, total = all_reduce_sum([correct, total], device)
        return correct / total if total else None

    def _records(
        self, step: int, epoch: int, result: dict[str, Any], new_acc: float | None, seconds: float
    ) -> list[dict[str, Any]]:
        """One line per k; ``top1_ci`` is top-1's bootstrap 95% interval over the queries and, after step
        0, ``drop_abs_ci`` the paired one of ``drop_abs`` (the same queries resampled at step 0 and now,
        :func:`~ftforget.stats.bootstrap_drop_ci`); either is None where its inputs are missing."""
        n = int(result["num_queries"])
        hits = {int(k): str(v) for k, v in (result.get("top1_hits") or {}).items()}
        if step == 0:
            self.baseline = {int(k): float(v) for k, v in result["top1"].items()}
            self.baseline_hits, self.baseline_queries = hits, n
        cis = {int(k): v for k, v in (result.get("top1_ci") or {}).items()}
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
            })  # fmt: skip
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
        for name in ("drop_abs", "drop_rel", "new_task_val_acc1"):
            if head[name] is not None:
                metrics[f"forgetting/{name}"] = head[name]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=head["step"])
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()  # measurements are rare and costly: do not lose one to a crash
        rank_zero_info(
            f"forgetting @ step {head['step']}: {self._probe.name} k-NN top-1 {head['top1']:.4f} "  # type: ignore[union-attr]
            f"(k={head['k']}, {head['seconds']:.1f}s)"
        )
