"""One backbone, any number of exported tasks, switched per batch.

A task is held as *substitutions*: modules of its own that take the place of some of the shared
backbone's modules while it is active, and the base's own modules put back when it is not.

- LoRA: each adapted Linear is replaced by a :class:`~ftforget.adapters.lora.LoRALinear` that wraps the
  shared Linear itself (``.base`` is the same object): switching moves module references, no weight is
  copied and no tensor is allocated;
- Block Expansion: ``blocks`` is replaced by a sequence of the shared original blocks with the task's new
  blocks between them; the base task runs the original sequence and skips them;
- top-k: the last k blocks (and the final norm, if it trained) are the task's own copies;
- full fine-tuning: the whole backbone is the task's own;
- linear probe: nothing but the head;
- the PEFT methods (``PeftMethod``, BitFit, SSF, AdaptFormer, VPT): the task attached onto a copy of the
  base (:func:`~ftforget.tasks.exported.attach_task`), whose backbone is the task's own while it is active
  (exact, but it holds a backbone's worth of memory, as full fine-tuning does; sharing the base's weights
  through PEFT's wrappers is not done yet).

The base task (``None``) is the shared backbone as it was given: the pretrained function exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ftforget.adapters.block_expansion import expand, paper_positions
from ftforget.adapters.lora import LoRALinear, apply_lora
from ftforget.tasks.delta import BACKBONE, state_hash
from ftforget.tasks.exported import ExportedTask, attach_task, check_base

#: methods held as a whole attached backbone of their own (see the module docstring)
ATTACHED_METHODS = ("PeftMethod", "BitFit", "SSF", "AdaptFormer", "VisualPromptTuning")

#: a substitution: (parent module, child name, the task's module)
Substitution = tuple[nn.Module, str, nn.Module]


@dataclass
class MemoryReport:
    """Bytes held by the multi-task model: the base once, and what each task adds to it."""

    base_bytes: int
    task_bytes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + sum(self.task_bytes.values())

    def lines(self) -> list[str]:
        rows = [f"base: {self.base_bytes:,} bytes"]
        rows += [f"task {name}: +{n:,} bytes" for name, n in self.task_bytes.items()]
        return [*rows, f"total: {self.total_bytes:,} bytes"]


def _storages(module: nn.Module) -> dict[int, int]:
    """``data_ptr -> bytes`` of every distinct tensor storage of ``module``'s parameters and buffers."""
    out: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


class MultiTaskModel(nn.Module):
    """A shared base backbone and exported tasks, one of which is active at a time.

    Args:
        base: the base backbone (a headless timm ViT, as :func:`~ftforget.backbones.build_backbone`
            returns); it is frozen and put in eval mode, and its weights are never written.
        base_source: how error messages name the base.
    """

    def __init__(self, base: nn.Module, base_source: str = "given") -> None:
        super().__init__()
        self.backbone = base.requires_grad_(False).eval()
        self.base_source = base_source
        self.base_sha256 = state_hash(base.state_dict())
        self.heads = nn.ModuleDict()
        self.task_modules = nn.ModuleDict()  # each task's own modules (LoRA wrappers, new blocks, copies)
        self.tasks: dict[str, ExportedTask] = {}
        self._substitutions: dict[str, list[Substitution]] = {}
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        self.active: str | None = None

    # ------------------------------------------------------------------------------------------ tasks
    def add_task(self, name: str, task: ExportedTask, ignore_base_hash: bool = False) -> None:
        """Adds an exported task under ``name`` (the base must be the task's, unless ``ignore_base_hash``)."""
        if not name or name in self.tasks:
            raise ValueError(f"task name {name!r} is empty or already taken")
        check_base(task, self.base_sha256, self.base_source, ignore_base_hash)
        self.use(None)
        own = {k[len(BACKBONE) :]: v for k, v in task.tensors.items() if k.startswith(BACKBONE)}
        builder = {
            "LoRA": self._lora,
            "BlockExpansion": self._block_expansion,
            "TopKFineTuning": self._top_k,
            "FullFineTuning": self._full,
            "LinearProbing": lambda _task, tensors: [],
            **dict.fromkeys(ATTACHED_METHODS, self._attached),
        }.get(task.method)
        if builder is None:
            raise ValueError(f"the multi-task model does not know method {task.method!r}")
        subs = builder(task, own)
        head = nn.Linear(task.tensors["head.weight"].shape[1], task.tensors["head.weight"].shape[0])
        head.load_state_dict({"weight": task.tensors["head.weight"], "bias": task.tensors["head.bias"]})
        self.heads[name] = head.requires_grad_(False)
        self.task_modules[name] = nn.ModuleList([m for _, _, m in subs]).requires_grad_(False).eval()
        self._substitutions[name] = subs
        self.tasks[name] = task

    def _load_into(self, module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Copies ``tensors`` under ``prefix`` into ``module``'s parameters (all of them must be there)."""
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)

    def _lora(self, task: ExportedTask, tensors: dict[str, torch.Tensor]) -> list[Substitution]:
        args = task.method_args
        before = dict(self.backbone.named_modules())
        layers = apply_lora(
            self.backbone, r=int(args.get("r", 8)), alpha=args.get("alpha"),
            targets=args.get("targets") or ["q", "v"], dropout=float(args.get("dropout", 0.0)),
        )  # fmt: skip
        subs: list[Substitution] = []
        with torch.no_grad():
            for name, module in list(self.backbone.named_modules()):
                if isinstance(module, LoRALinear) and before.get(name) is not module:
                    parent_name, _, attr = name.rpartition(".")
                    parent = self.backbone.get_submodule(parent_name)
                    for part in ("lora_A", "lora_B"):
                        for key, param in getattr(module, part).items():
                            param.copy_(tensors.pop(f"{name}.{part}.{key}"))
                    subs.append((parent, attr, module))
                    parent._modules[attr] = module.base  # the shared Linear back in place
        if len(subs) != len(layers) or tensors:
            raise ValueError(
                f"the LoRA task's tensors do not match its adapters (left over: {sorted(tensors)[:3]})"
            )
        return subs

    def _block_expansion(self, task: ExportedTask, tensors: dict[str, torch.Tensor]) -> list[Substitution]:
        args = task.method_args
        original = self.backbone.blocks
        depth = len(original)
        if args.get("positions") is not None:
            positions = list(args["positions"])
        else:
            positions = paper_positions(depth, int(args["p"]))
        new_indices = expand(self.backbone, positions)  # deep copies of the original blocks, then loaded
        expanded = self.backbone.blocks
        self.backbone.blocks = original
        for i in new_indices:
            self._load_into(expanded[i], tensors, f"blocks.{i}.")
        return [(self.backbone, "blocks", expanded)]

    def _top_k(self, task: ExportedTask, tensors: dict[str, torch.Tensor]) -> list[Substitution]:
        k, depth = int(task.method_args.get("k", 3)), len(self.backbone.blocks)
        blocks = list(self.backbone.blocks)
        for i in range(depth - k, depth):
            blocks[i] = copy.deepcopy(blocks[i])
            self._load_into(blocks[i], tensors, f"blocks.{i}.")
        subs: list[Substitution] = [(self.backbone, "blocks", nn.Sequential(*blocks))]
        if any(key.startswith("norm.") for key in tensors):
            norm = copy.deepcopy(self.backbone.norm)
            self._load_into(norm, tensors, "norm.")
            subs.append((self.backbone, "norm", norm))
        return subs

    def _attached(self, task: ExportedTask, tensors: dict[str, torch.Tensor]) -> list[Substitution]:
        with self.using(None):
            attached = attach_task(task, self.backbone, self.base_source)
        return [(self, "backbone", attached.backbone.requires_grad_(False).eval())]

    def _full(self, task: ExportedTask, tensors: dict[str, torch.Tensor]) -> list[Substitution]:
        own = copy.deepcopy(self.backbone)
        own.load_state_dict(tensors, strict=True)
        return [(self, "backbone", own)]

    # -------------------------------------------------------------------------------------- switching
    def use(self, name: str | None) -> None:
        """Makes task ``name`` active (``None``: the base). Moves module references only."""
        if name is not None and name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; tasks: {sorted(self.tasks)}")
        if name == self.active:
            return
        for parent, attr, module in reversed(self._originals):
            parent._modules[attr] = module
        self._originals = []
        for parent, attr, module in self._substitutions.get(name, []) if name is not None else []:
            self._originals.append((parent, attr, parent._modules[attr]))
            parent._modules[attr] = module
        self.active = name

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Task ``name`` active inside, the previous one after."""
        previous = self.active
        self.use(name)
        try:
            yield
        finally:
            self.use(previous)

    def features(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """The feature (CLS token after the final norm) of ``x`` under ``task`` (``None``: the base's)."""
        with self.using(task):
            return self.backbone(x)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """The logits of ``task``'s head on ``x``."""
        if task not in self.heads:
            raise ValueError(f"task {task!r} has no head; tasks: {sorted(self.tasks)}")
        return self.heads[task](self.features(x, task))

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to(), .half(), ...: with the base's own modules in place, so that they move too
        with self.using(None):
            return super()._apply(fn, *args, **kwargs)

    # ----------------------------------------------------------------------------------------- memory
    def memory(self) -> MemoryReport:
        """The base's bytes once, and for each task the bytes of storage that the base does not hold."""
        with self.using(None):
            base = _storages(self.backbone)
        tasks = {}
        for name in self.tasks:
            own = {**_storages(self.task_modules[name]), **_storages(self.heads[name])}
            tasks[name] = sum(n for ptr, n in own.items() if ptr not in base)
        return MemoryReport(sum(base.values()), tasks)
