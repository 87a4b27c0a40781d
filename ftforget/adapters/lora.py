"""LoRA (Hu et al., 2021) on the linear layers of a timm ViT, fused qkv included.

timm computes q, k and v with one fused ``qkv`` Linear whose output rows are ``[q | k | v]``. A LoRA
on "q and v only" (the paper's and PEFT's default for ViTs) is therefore a low-rank update of two row
slices of that one weight, with the k rows untouched. :class:`LoRALinear` owns the original Linear and
one ``(A, B)`` pair per adapted row slice, so the same class serves the fused qkv and plain layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Where each target lives inside a timm ``Block``: (attribute path, row slice index or None for all rows).
_QKV_ROWS = {"q": 0, "k": 1, "v": 2}
_PLAIN_TARGETS = {"proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
LORA_TARGETS = tuple(_QKV_ROWS) + tuple(_PLAIN_TARGETS)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank updates ``scale * B @ A`` on chosen slices of its output rows.

    ``B`` starts at zero, so the module is an exact identity wrapper at initialisation.

    Args:
        base: the Linear to adapt; kept as ``self.base`` and frozen.
        slices: ``name -> (start, stop)`` output-row ranges that get their own low-rank update.
        r: rank.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch input.
    """

    def __init__(
        self, base: nn.Linear, slices: dict[str, tuple[int, int]], r: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got r={r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1]))  # row order, for _b_full
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            a = torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT and the original LoRA code
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(base.weight.new_zeros(stop - start, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self._backup: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update ``scale * B @ A`` that this adapter adds to the rows of slice ``name``."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled or self.merged:
            return out
        # All slices in two matmuls: h = x A_cat^T (n_slices * r columns), then out += scale * h B_full^T,
        # where B_full places each B at its rows (zero rows elsewhere: k of qkv). One fused addmm, no cat.
        h = F.linear(self.dropout(x), self._a_cat())
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self._b_full().t(), alpha=self.scale
        )
        return flat.view(out.shape)

    def _a_cat(self) -> torch.Tensor:
        return torch.cat([self.lora_A[name] for name in self.slices], dim=0)

    def _b_full(self) -> torch.Tensor:
        """``(out_features, n_slices * r)``: each slice's B in its rows and its own r columns, zeros elsewhere."""
        n, r = len(self.slices), self.r
        if n == 1 and next(iter(self.slices.values())) == (0, self.out_features):
            return next(iter(self.lora_B.values()))
        rows, cursor = [], 0
        for j, (name, (start, stop)) in enumerate(self.slices.items()):  # sorted by start
            b = self.lora_B[name]
            if start > cursor:
                rows.append(b.new_zeros(start - cursor, n * r))
            rows.append(F.pad(b, (j * r, (n - j - 1) * r)))
            cursor = stop
        if cursor < self.out_features:
            rows.append(rows[-1].new_zeros(self.out_features - cursor, n * r))
        return torch.cat(rows)

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with, ``W + scale · B_full @ A_cat`` (differentiable in A and B;
        ``W`` itself when disabled or merged, where the update is off or already inside ``W``)."""
        if not self.enabled or self.merged:
            return self.base.weight
        return self.base.weight + (self._b_full() @ self._a_cat()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the updates into the base weight (idempotent). :meth:`unmerge` restores it bit-exactly.

        A disabled adapter adds nothing (it stays unmerged): merging must not change what the layer computes,
        so :func:`lora_merged` inside :func:`lora_disabled` still runs the pretrained function.
        """
        if self.merged or not self.enabled:
            return
        self._backup = self.base.weight.detach().clone()
        for name, (start, stop) in self.slices.items():
            self.base.weight[start:stop] += self.delta_weight(name).to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the base weight saved by :meth:`merge` (idempotent)."""
        if not self.merged:
            return
        assert self._backup is not None
        self.base.weight.copy_(self._backup)
        self._backup = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, slices={self.slices}"


def apply_lora(
    vit: nn.Module,
    r: int,
    alpha: float | None = None,
    targets: Sequence[str] = ("q", "v"),
    dropout: float = 0.0,
) -> list[LoRALinear]:
    """Wraps the targeted Linear layers of every block of a timm ViT in :class:`LoRALinear`, in place.

    Args:
        vit: a timm ``VisionTransformer`` (anything with ``.blocks`` of timm ``Block``).
        r: rank (>= 1).
        alpha: scale numerator, ``alpha / r`` multiplies the update; ``None`` means ``alpha = r``.
        targets: any of ``q``, ``k``, ``v`` (rows of the fused qkv), ``proj`` (attention output),
            ``fc1``, ``fc2`` (MLP).
        dropout: dropout on the LoRA branch input.

    Returns:
        The new LoRA modules, one per adapted Linear.
    """
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got r={r}")
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or targets}; choose from {list(LORA_TARGETS)}")
    alpha = float(r if alpha is None else alpha)
    modules: list[LoRALinear] = []
    for block in vit.blocks:
        qkv_targets = [t for t in targets if t in _QKV_ROWS]
        if qkv_targets:
            qkv = block.attn.qkv
            dim = qkv.out_features // 3
            slices = {t: (_QKV_ROWS[t] * dim, (_QKV_ROWS[t] + 1) * dim) for t in qkv_targets}
            block.attn.qkv = LoRALinear(qkv, slices, r, alpha, dropout)
            modules.append(block.attn.qkv)
        for t in targets:
            if t in _PLAIN_TARGETS:
                parent_name, attr = _PLAIN_TARGETS[t].split(".")
                parent = getattr(block, parent_name)
                layer = getattr(parent, attr)
                wrapped = LoRALinear(layer, {t: (0, layer.out_features)}, r, alpha, dropout)
                setattr(parent, attr, wrapped)
                modules.append(wrapped)
    return modules


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    """Every :class:`LoRALinear` inside ``model``."""
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def merge_lora(model: nn.Module) -> None:
    """Merges every LoRA update into its base weight."""
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restores every base weight that :func:`merge_lora` changed."""
    for m in lora_modules(model):
        m.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Runs the model as if it had no LoRA (the pretrained function), restoring the previous state after."""
    mods = list(lora_modules(model))
    previous = [(m.enabled, m.merged) for m in mods]
    for m in mods:
        m.unmerge()
        m.enabled = False
    try:
        yield
    finally:
        for m, (enabled, merged) in zip(mods, previous, strict=True):
            m.enabled = enabled
            if merged:
                m.merge()


@contextmanager
def lora_merged(model: nn.Module) -> Iterator[None]:
    """Runs the model with every LoRA merged (one matmul per layer), unmerging bit-exactly after."""
    mods = [m for m in lora_modules(model) if not m.merged]
    for m in mods:
        m.merge()
    try:
        yield
    finally:
        for m in mods:
            m.unmerge()
