"""The base LightningModule every adaptation method shares.

A method differs from another only in the surgery it does on the backbone and in which parameters it
trains (``set_trainable``); loop, loss, metrics, optimiser and schedule live here once.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ftforget.backbones import DEFAULT_BACKBONE, build_backbone, feature_dim, restored_later
from ftforget.inference import eval_mode
from ftforget.methods.regularizers import (
    OPTION,
    Anchors,
    anchor_state,
    check_weight,
    distillation_loss,
    frozen_copy,
    l2sp_distance,
    l2sp_penalty,
    load_earlier_head,
    load_head,
    regularizer_suffix,
)
from ftforget.methods.schedule import (
    build_lr_scheduler,
    build_optimizer,
    check_optimization,
    resolve_spec,
    warmup_cosine,
)

#: the checkpoint entry naming the method class (a key of ``ftforget.methods.registry.METHODS``)
METHOD_KEY = "ftforget_method"
#: the checkpoint entry holding the random states at the time it was saved
RNG_KEY = "ftforget_rng_states"


def save_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), ``random`` and NumPy states as tensors and plain python values."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "python": list(random.getstate()),  # (version, 625 ints, gauss_next): plain python values
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undoes :func:`save_rng_states`."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


__all__ = ["FineTuningModule", "warmup_cosine"]


class FineTuningModule(L.LightningModule):
    """A backbone (headless timm ViT) and a linear head, trained on a new classification task.

    Subclasses call ``super().__init__(**kwargs)``, do their surgery on ``self.backbone``, then call
    :meth:`set_trainable` once with the modules that train; nothing changes ``requires_grad`` after.

    Args:
        num_classes: classes of the new task (linked from the data module by the CLI).
        backbone: timm model name.
        checkpoint: local backbone weights (timm, original DINO or Hugging Face format).
        pretrained: download timm's weights for ``backbone`` (needs internet access).
        backbone_kwargs: extra ``timm.create_model`` arguments, e.g. a tiny ``depth``/``embed_dim``.
        optimizer: ``{"class_path": <a torch.optim.Optimizer>, "init_args": {...}}`` (the CLI's
            ``--optimizer``), built over the trainable parameters only; ``None``: the paper's
            :data:`~ftforget.methods.schedule.DEFAULT_OPTIMIZER` (SGD, lr 0.005, momentum 0.9).
        lr_scheduler: ``{"class_path": <an LRScheduler>, "init_args": {...}}`` (the CLI's
            ``--lr_scheduler``), stepped every optimizer step; a ``total_steps`` left ``None`` is the
            trainer's number of optimizer steps. ``None``: the paper's
            :data:`~ftforget.methods.schedule.DEFAULT_LR_SCHEDULER` (500 warmup steps, then cosine).
        label_smoothing: cross-entropy label smoothing (the paper uses none).
        compile: run the backbone through ``torch.compile`` (first steps are slow while it compiles;
            parameters and checkpoints are unchanged).
        l2sp_weight: L2-SP: weight λ of ``λ Σ ||θ - θ0||²`` over the trainable backbone parameters, θ0 their
            step-0 values (:mod:`~ftforget.methods.regularizers`); 0: off. Logged as ``train/loss_l2sp``.
        distill_weight: feature distillation: weight λ of ``λ · mean ||f(x) - f0(x)||²`` between the
            backbone feature and the frozen step-0 network's on the training batch; 0: off. Logged as
            ``train/loss_distill``. LoRA and Block Expansion need no second copy of the backbone; full and
            top-k fine-tuning keep a frozen one.
        anchor_weights: what L2-SP and distillation pull toward: ``None``, this run's step-0 backbone; a
            backbone weights file (as ``checkpoint``), those weights (a stream's pretrained start, where
            each task starts from the previous one's end). With a file, L2-SP sums over the backbone
            weights the method changes (:meth:`anchored_weights`) and distillation keeps a frozen network
            built from the file. Read once, when the run starts (a resume brings both back).
        lp_steps: LP-FT inside one run: for the first ``lp_steps`` optimizer steps only the head trains (a
            linear probe), then the method; 0: off.
        head_from: LP-FT from a linear-probe run: a run directory (its best checkpoint) or a ``.ckpt`` whose
            head initialises this model's head (same backbone and classes). Read once, when the run starts.
        label_offset: class-incremental learning (one head shared by the tasks of a stream,
            ``ftforget stream`` with ``heads: shared``): the number of earlier classes the head keeps before
            this task's. The head then has ``label_offset + num_classes`` outputs and this task's labels
            ``y`` are ``y + label_offset`` for the loss and the train/val/test accuracies (argmax over every
            output); 0: a head over this task's classes only.
        earlier_head_from: with ``label_offset``: a ``.ckpt`` whose head (over the ``label_offset`` earlier
            classes) initialises this head's first rows, copied exactly; this task's rows start as a new
            head's. Read once, when the run starts.
    """

    #: how tables and figures name the method; ``{arg}`` fields are filled from its init arguments
    table_label: ClassVar[str] = ""

    def __init__(
        self,
        num_classes: int = 100,
        backbone: str = DEFAULT_BACKBONE,
        checkpoint: str | None = None,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        l2sp_weight: float = 0.0,
        distill_weight: float = 0.0,
        anchor_weights: str | None = None,
        lp_steps: int = 0,
        head_from: str | None = None,
        label_offset: int = 0,
        earlier_head_from: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        check_weight("l2sp_weight", l2sp_weight)
        check_weight("distill_weight", distill_weight)
        if lp_steps < 0:
            raise ValueError(f"{OPTION}.lp_steps must be >= 0, got {lp_steps}")
        if anchor_weights is not None and not (l2sp_weight or distill_weight):
            raise ValueError(
                f"{OPTION}.anchor_weights is the anchor of L2-SP and distillation: set "
                f"{OPTION}.l2sp_weight or {OPTION}.distill_weight too (both are 0)"
            )
        if (
            anchor_weights is not None
            and not restored_later()
            and not Path(anchor_weights).expanduser().is_file()
        ):
            raise FileNotFoundError(
                f"{OPTION}.anchor_weights: backbone weights file {anchor_weights!r} does not exist"
            )
        if not isinstance(label_offset, int) or label_offset < 0:
            raise ValueError(f"{OPTION}.label_offset must be an integer >= 0, got {label_offset!r}")
        if earlier_head_from is not None and not label_offset:
            raise ValueError(
                f"{OPTION}.earlier_head_from needs {OPTION}.label_offset > 0 (the earlier classes)"
            )
        # The recipe itself goes into the hyperparameters (not None): a checkpoint rebuilds the same one
        # even if the defaults change.
        optimizer, lr_scheduler = (
            resolve_spec(optimizer, "optimizer"),
            resolve_spec(lr_scheduler, "lr_scheduler"),
        )
        check_optimization(optimizer, lr_scheduler)
        if checkpoint is not None and not restored_later() and not Path(checkpoint).expanduser().is_file():
            raise FileNotFoundError(f"model.checkpoint: backbone weights file {checkpoint!r} does not exist")
        self.save_hyperparameters()
        self.backbone = build_backbone(
            backbone, checkpoint=checkpoint, pretrained=pretrained, **(backbone_kwargs or {})
        )
        num_classes += label_offset  # class-incremental: the earlier classes' outputs first
        self.head = nn.Linear(feature_dim(self.backbone), num_classes)
        if head_from is not None and not restored_later():  # a restore brings the trained head back
            source = load_head(head_from, self.head)
            rank_zero_info(f"{type(self).__name__}: head initialised from {source} (LP-FT)")
        if earlier_head_from is not None and not restored_later():
            source = load_earlier_head(earlier_head_from, self.head, label_offset)
            rank_zero_info(
                f"{type(self).__name__}: the {label_offset} earlier classes' head rows from {source}"
            )
        # Kept out of the module tree so that state-dict keys and checkpoints do not change.
        self._compiled: list[nn.Module] = []
        top5 = min(5, num_classes)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        # The mean loss over the split as sums (loss x images, images) added up over the processes: Lightning's
        # own mean of a logged value divides by the mean image count as an integer, off by one image under
        # DDP whenever the split's size is odd. Metric states stay out of the state dict.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @classmethod
    def describe(cls, init_args: dict[str, Any]) -> str:
        """The method's name in a table, e.g. ``LoRA r=4``, from its init arguments (defaults filled in)."""
        defaults = {
            name: p.default
            for c in cls.__mro__
            if "__init__" in vars(c)
            for name, p in inspect.signature(c.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        args = {**defaults, **init_args}
        try:
            label = (cls.table_label or cls.__name__).format(**args)
        except (KeyError, IndexError):
            label = cls.__name__
        shared = f" + {args['label_offset']} earlier classes" if args.get("label_offset") else ""
        return label + regularizer_suffix(args) + shared

    # ----------------------------------------------------------------------------------- trainability
    def set_trainable(self, modules: Iterable[nn.Module | nn.Parameter]) -> None:
        """Freezes every parameter, then unfreezes exactly those of ``modules`` (selected by identity).

        Then sets up the anti-forgetting terms that are switched on: they need to know what trains.
        """
        self.requires_grad_(False)
        for item in modules:
            item.requires_grad_(True)
        self._setup_regularizers()

    def _setup_regularizers(self) -> None:
        hp = self.hparams
        trainable = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        if not trainable:
            asked = [f"{OPTION}.{k}" for k in ("l2sp_weight", "distill_weight", "lp_steps") if hp.get(k)]
            if asked:
                raise ValueError(
                    f"{', '.join(asked)}: {type(self).__name__} trains no backbone parameter, so there is "
                    "nothing to regularise or to stage (set them to 0)"
                )
            return
        anchor = hp.get("anchor_weights")
        if anchor is None:
            if hp.get("l2sp_weight"):
                self.l2sp_anchors = Anchors(trainable)
            if hp.get("distill_weight") and self.pretrained_context() is None:
                self.distill_teacher = frozen_copy(self.backbone)
            return
        # A fixed anchor: its tensors and teacher are buffers and parameters of this module, so a restore
        # (weights restored later) builds placeholders of the right shapes and the checkpoint fills them.
        values = {n: w.detach() for n, w in self.anchored_weights().items()} if hp.get("l2sp_weight") else {}
        network = None
        if restored_later():
            state = values
            if hp.get("distill_weight"):
                network = frozen_copy(self.backbone)
        else:
            state, network = anchor_state(hp.backbone, anchor, hp.backbone_kwargs or {})
        if values:
            missing = [n for n in values if n not in state or state[n].shape != values[n].shape]
            if missing:
                raise ValueError(
                    f"{OPTION}.anchor_weights: {type(self).__name__} trains weights with no counterpart of "
                    f"the same shape in {anchor!r} (e.g. {missing[0]!r})"
                )
            self.l2sp_anchors = Anchors([(n, state[n]) for n in values])
        if hp.get("distill_weight"):
            self.distill_teacher = network

    def anchored_weights(self) -> dict[str, torch.Tensor]:
        """The backbone weights this method changes, under their timm names, as functions of what trains
        (differentiable): L2-SP's terms against a fixed anchor (``anchor_weights``). Here the trainable
        backbone parameters themselves (full and top-k fine-tuning); a method whose trainable tensors are
        not backbone weights overrides it (LoRA) or raises (Block Expansion's new blocks).
        """
        return {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of backbone and head (a distillation teacher's not counted)."""
        params = [p for n, p in self.named_parameters() if not n.startswith("distill_teacher.")]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        return trainable, total

    # ------------------------------------------------------------------- the step-0 network, the knob
    def pretrained_context(self) -> AbstractContextManager | None:
        """A context in which ``self.backbone`` computes its step-0 (pretrained) function without a copy, or
        None where the method cannot switch its change off (full and top-k fine-tuning)."""
        return None

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature of the frozen step-0 network (feature distillation's target), in eval mode, no grad."""
        with torch.no_grad():
            context = None if hasattr(self, "distill_teacher") else self.pretrained_context()
            if context is None:
                teacher = self.distill_teacher
                teacher.eval()
                return teacher(x)
            with eval_mode(self.backbone), context:
                return self.backbone(x)

    @torch.no_grad()
    def apply_knob(self, start: FineTuningModule, a: float) -> None:
        """Sets every backbone weight to ``W0 + a (W1 - W0)`` in place (``torch.lerp``: exact at 0 and 1),
        ``W1`` this model's, ``W0`` those of ``start`` (the same method at step 0); the head is kept.

        Raises:
            ValueError: ``start`` has other weights or, where this model has frozen weights, different ones.
        """
        self.check_knob_start(start)
        ends = self.backbone.state_dict()
        starts = start.backbone.state_dict()
        for name, end in ends.items():
            if end.is_floating_point():
                end.copy_(torch.lerp(starts[name].to(end.device, end.dtype), end, a))

    def check_knob_start(self, start: FineTuningModule) -> None:
        """``start`` must have this backbone's tensors, and its frozen ones bit for bit (else it is not the
        step-0 model of this run: another weights file, another architecture)."""
        ends, starts = self.backbone.state_dict(), start.backbone.state_dict()
        if list(ends) != list(starts) or any(ends[k].shape != starts[k].shape for k in ends):
            raise ValueError("the step-0 model has other backbone tensors than the checkpoint")
        frozen = {n for n, p in self.backbone.named_parameters() if not p.requires_grad}
        differ = [n for n in frozen if not torch.equal(ends[n].cpu(), starts[n].cpu())]
        if differ:
            raise ValueError(
                f"the step-0 model's frozen weights differ from the checkpoint's in {len(differ)} tensors "
                f"(e.g. {differ[0]!r}): it was not built from the weights the run started from"
            )

    # ------------------------------------------------- what the probe measures (ftforget.inference)
    @property
    def feature_module(self) -> nn.Module:
        """The weights :meth:`features` depends on: the backbone (a changing head leaves features alone).

        A subclass whose :meth:`features` reads other modules must return a module holding all of them.
        """
        return self.backbone

    def inference_context(self) -> AbstractContextManager:
        """How :meth:`features` runs for inference (the probe, ``ftforget measure``): as it is here."""
        return nullcontext()

    # ---------------------------------------------------------------------------------------- forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone feature: the CLS token after the final norm (what the forgetting probe uses)."""
        if self.hparams.compile and self.training:
            if not self._compiled:
                self._compiled.append(torch.compile(self.backbone))
            return self._compiled[0](x)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # ------------------------------------------------------------------------------------------ steps
    def training_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a training batch (a method with cached features overrides this)."""
        return self(x)

    def method_loss_terms(self) -> dict[str, torch.Tensor]:
        """A method's own terms added to the loss of a training step, ``name -> value`` (each logged as
        ``train/loss_<name>``, ``train/loss`` their sum with the cross-entropy); none by default."""
        return {}

    def in_probe_stage(self) -> bool:
        """Whether this step is in LP-FT's first stage (``lp_steps``), where only the head trains."""
        return self.global_step < self.hparams.get("lp_steps", 0)

    def task_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The task's labels as this head's classes: ``y + label_offset`` (``y`` itself without one)."""
        offset = self.hparams.get("label_offset", 0)
        return y + offset if offset else y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], self.task_labels(batch[1])
        hp = self.hparams
        probe_stage = self.in_probe_stage()
        distill = bool(hp.get("distill_weight")) and not probe_stage
        features = None
        if probe_stage or distill:
            # In the probe stage the backbone's parameters get no gradient: the optimiser skips them.
            with torch.no_grad() if probe_stage else nullcontext():
                features = self.features(x)
            logits = self.head(features)
        else:
            logits = self.training_logits(x)
        loss = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        terms: dict[str, torch.Tensor] = {}
        if hp.get("l2sp_weight") and not probe_stage:
            if hp.get("anchor_weights") is None:
                terms["l2sp"] = hp.l2sp_weight * l2sp_penalty(self.backbone, self.l2sp_anchors)
            else:
                terms["l2sp"] = hp.l2sp_weight * l2sp_distance(self.anchored_weights(), self.l2sp_anchors)
        if distill:
            assert features is not None
            terms["distill"] = hp.distill_weight * distillation_loss(features, self.frozen_features(x))
        if not probe_stage:
            terms.update(self.method_loss_terms())
        if terms:  # each term on its own curve; train/loss is their sum
            self.log("train/loss_ce", loss)
            for name, term in terms.items():
                self.log(f"train/loss_{name}", term)
                loss = loss + term
        self.train_acc1(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch[0], self.task_labels(batch[1])
        logits = self(x)
        acc1, acc5 = getattr(self, f"{stage}_acc1"), getattr(self, f"{stage}_acc5")
        acc1(logits, y)
        acc5(logits, y)
        loss = getattr(self, f"{stage}_loss")
        loss.update(F.cross_entropy(logits, y), weight=y.shape[0])
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/acc1", acc1, prog_bar=True)
        self.log(f"{stage}/acc5", acc5)
        if stage == "val" and self.trainer.state.fn == "fit":
            # Lightning logs a validation inside a fit at its step count of before that step (step 30's at
            # 29); a "step" value is its x-axis: the step whose weights were validated, as the checkpoint name.
            self.log("step", float(self.trainer.global_step))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------------------ optimiser, hooks
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        optimizer = build_optimizer(self.hparams.optimizer, params)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_lr_scheduler(self.hparams.lr_scheduler, optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The registered method name: what ftforget.methods.registry rebuilds the checkpoint as.
        checkpoint[METHOD_KEY] = type(self).__name__
        # Random states, so that a resume draws the dropout masks the uninterrupted fit would have drawn
        # (plain types and tensors: checkpoints load with weights_only=True).
        checkpoint[RNG_KEY] = save_rng_states()
        # The state dict holds every weight: a checkpoint must load where the pretrained weights file (or
        # the internet) is not. The original source stays in the run's hparams.yaml and config.yaml.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            checkpoint["hyper_parameters"] = {
                **hparams, "checkpoint": None, "pretrained": False, "head_from": None, "earlier_head_from": None
            }  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._match_teacher_depth(checkpoint.get("state_dict") or {})
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            restore_rng_states(checkpoint[RNG_KEY])

    def _match_teacher_depth(self, state: dict[str, Any]) -> None:
        """A restored distillation teacher of a fixed anchor was built as a placeholder copy of this backbone;
        where the checkpoint's teacher has another number of blocks (Block Expansion in a stream: the anchor
        is the shallower start), the placeholder is rebuilt with that many, so the state dict loads strictly."""
        teacher = getattr(self, "distill_teacher", None)
        if teacher is None or not self.hparams.get("anchor_weights") or not hasattr(teacher, "blocks"):
            return
        blocks = {k.split(".")[2] for k in state if k.startswith("distill_teacher.blocks.")}
        if not blocks or len(blocks) == len(teacher.blocks):
            return
        from ftforget.backbones import weights_restored_later

        kwargs = {**(self.hparams.backbone_kwargs or {}), "depth": len(blocks)}
        with weights_restored_later():
            rebuilt = frozen_copy(build_backbone(self.hparams.backbone, **kwargs))
        self.distill_teacher = rebuilt.to(next(teacher.parameters()).device)

    def on_fit_start(self) -> None:
        trainable, total = self.parameter_counts()
        rank_zero_info(
            f"{type(self).__name__}: {trainable:,} trainable parameters of {total:,} "
            f"({100.0 * trainable / total:.3f}%) on backbone {self.hparams.backbone}"
        )

    def on_test_start(self) -> None:
        # A test logs into the run's directory with a new logger, which rewrites hparams.yaml: keep the counts.
        self.on_train_start()

    def on_train_start(self) -> None:
        trainable, total = self.parameter_counts()
        counts = {"params/trainable": trainable, "params/total": total}
        for logger in self.loggers:
            logger.log_metrics(counts, step=self.global_step)
            # TensorBoard scalars are float32 (85,875,556 reads back as 85,875,552): keep exact integers too.
            logger.log_hyperparams(counts)
