"""The probe's settings, written once: one typed object taken whole by the callback and ``ftforget measure``.

Both take a ``knn`` argument of type :class:`KNNConfig`, so in YAML and on the command line the same keys
mean the same thing (``--trainer.callbacks.init_args.knn.k`` during training, ``--knn.k`` in
``ftforget measure``), with the same defaults, and a bad value fails at parse time with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from ftforget.forgetting.knn import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_K,
    DEFAULT_QUERY_CHUNK,
    DEFAULT_TEMPERATURE,
    check_knn_args,
)
from ftforget.machine import default_num_workers

#: global steps the forgetting callback measures at by default; log-spaced, forgetting is fastest early
DEFAULT_EVAL_STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

DTypeName = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def eval_steps_until(last_step: int, steps: tuple[int, ...] = DEFAULT_EVAL_STEPS) -> list[int]:
    """``steps`` below ``last_step``, and ``last_step`` itself: a schedule that ends with the run."""
    return sorted({s for s in steps if s < last_step} | {last_step})


def to_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a :data:`DTypeName` (None stays None)."""
    return None if name is None else _DTYPES[name]


@dataclass
class KNNConfig:
    """How the probe is measured: DINO's weighted k-NN and the feature extraction behind it.

    Args:
        k: neighbour count(s), evaluated in one pass; the first is the headline one (DINO: 20; it also
            reports 10, 100, 200).
        temperature: DINO's T in the vote weight ``exp(sim / T)``.
        batch_size: images per forward pass during feature extraction (per process).
        num_workers: data-loading workers per process (default: ``min(8, cores - 1)``,
            :func:`~ftforget.machine.default_num_workers`).
        bank_dtype: storage of the bank and query features (``float32`` as DINO; ``float16`` halves the
            memory of a 1.28M-image bank).
        autocast_dtype: autocast dtype of the forward pass on CUDA (None: fp32); the CPU always runs fp32.
        query_chunk: queries per similarity block.
        bank_chunk: bank rows per similarity block.
    """

    k: PositiveInt | list[PositiveInt] = field(default_factory=lambda: [DEFAULT_K])
    temperature: PositiveFloat = DEFAULT_TEMPERATURE
    batch_size: PositiveInt = 256
    num_workers: NonNegativeInt = field(default_factory=default_num_workers)
    bank_dtype: DTypeName = "float32"
    autocast_dtype: DTypeName | None = "bfloat16"
    query_chunk: PositiveInt = DEFAULT_QUERY_CHUNK
    bank_chunk: PositiveInt = DEFAULT_BANK_CHUNK

    def __post_init__(self) -> None:
        # Plain python types: jsonargparse's restricted types (PositiveFloat, ...) must not reach
        # checkpoints, which are loaded with weights_only=True.
        self.temperature = float(self.temperature)
        for name in ("batch_size", "num_workers", "query_chunk", "bank_chunk"):
            setattr(self, name, int(getattr(self, name)))
        # The same checks as the parser's types, for objects built in Python; messages name the key.
        try:
            self.k = check_knn_args([self.k] if isinstance(self.k, int) else self.k, self.temperature)
        except ValueError as err:
            raise ValueError(f"knn: {err}") from None
        for name in ("batch_size", "query_chunk", "bank_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"knn.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"knn.num_workers must be >= 0, got {self.num_workers}")
        for name in ("bank_dtype", "autocast_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise ValueError(f"knn.{name}={value!r} is not one of {sorted(_DTYPES)}")
        if self.bank_dtype is None:
            raise ValueError("knn.bank_dtype cannot be None")

    @property
    def ks(self) -> list[int]:
        """The k values as a list (the first is the headline one)."""
        return list(self.k)  # type: ignore[arg-type]

    def extraction_settings(self, device: torch.device) -> dict[str, object]:
        """Everything besides weights and data that can change a feature's bits (for the cache key)."""
        return {
            "bank_dtype": self.bank_dtype,
            "autocast_dtype": self.autocast_dtype if device.type == "cuda" else None,
            "device_type": device.type,
            "batch_size": self.batch_size,  # batch composition can change the last bits of a forward pass
        }


@dataclass
class SubsetConfig:
    """A subset probe: ``bank_per_class`` bank images and ``queries_per_class`` queries of every class,
    drawn ``draws`` times (seeds ``seed, seed + 1, ...``) and measured together, the way DINOv2 evaluates
    few-shot banks.

    Each draw is its own k-NN measurement; the result is their pooled top-1 (every draw's queries
    together: the mean over the draws, the draws having equal query counts) with the spread over the
    draws (sample std) beside the bootstrap interval over the pooled queries. The images the draws use
    are extracted once (their union), then each draw runs its k-NN. Consecutive seeds give disjoint
    draws as long as a class has ``draws * n`` images, and overlap as little as possible beyond
    (:func:`~ftforget.data.probe.draw_per_class`); a class with fewer than ``n`` images gives all it has,
    and a warning names it.

    Args:
        bank_per_class: bank images per class and draw (None: the whole bank, in every draw).
        queries_per_class: queries per class and draw (None: every query, in every draw); with both None
            the whole probe is measured, once.
        draws: how many draws (with ``probe_budget``, the draws of the subset it sizes).
        seed: the first draw's seed.
    """

    bank_per_class: PositiveInt | None = None
    queries_per_class: PositiveInt | None = None
    draws: PositiveInt = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("bank_per_class", "queries_per_class"):
            value = getattr(self, name)
            if value is not None:
                if int(value) < 1:
                    raise ValueError(f"subset.{name} must be >= 1 or None, got {value}")
                setattr(self, name, int(value))
        self.draws, self.seed = int(self.draws), int(self.seed)
        if self.draws < 1:
            raise ValueError(f"subset.draws must be >= 1, got {self.draws}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.draws))

    @property
    def is_full(self) -> bool:
        """No subset at all: every draw would be the whole probe, which is measured once."""
        return self.bank_per_class is None and self.queries_per_class is None

    def signature(self) -> str:
        """What identifies the draws in cache keys and logs."""
        return f"subset:bank={self.bank_per_class}:queries={self.queries_per_class}:seeds={self.seeds}"
