"""The embedded miniature: scikit-learn's handwritten digits, real data that installs with a package.

1,797 8x8 grey images of 10 digits. The digits are split in two domains: the *old* domain (by default
0-4) plays ImageNet-1k (a tiny ViT is pretrained on it and the forgetting probe measures k-NN accuracy
on it), the *new* domain (5-9) plays CIFAR-100 (the task every method fine-tunes on). Images are
upsampled to ``image_size`` and given three channels so that they pass through the same timm ViT
architecture as the real run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ftforget.data.base import FineTuneDataModule
from ftforget.data.probe import IndexedDataset, ProbeData

OLD_DIGITS = (0, 1, 2, 3, 4)
NEW_DIGITS = (5, 6, 7, 8, 9)


def load_digit_images(digits: Sequence[int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``digits`` as ``(N, 3, image_size, image_size)`` floats normalised to mean 0.5/std 0.5,
    and labels ``0..len(digits)-1`` in the order of ``digits``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    targets = torch.as_tensor(bunch.target, dtype=torch.long)
    digits = list(digits)
    unknown = [d for d in digits if not 0 <= d <= 9]
    if unknown or len(set(digits)) != len(digits) or len(digits) < 2:
        raise ValueError(f"digits {digits} must be at least two distinct values in 0..9")
    keep = torch.isin(targets, torch.tensor(digits))
    images, targets = images[keep], targets[keep]
    labels = torch.tensor([digits.index(int(t)) for t in targets])
    x = F.interpolate(images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return x, labels


def split_indices(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """A fixed-seed stratified split: each class is cut into consecutive parts of the given fractions."""
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        bounds = torch.tensor([0.0, *fractions]).cumsum(0) * len(idx)
        for i in range(len(fractions)):
            parts[i].append(idx[int(bounds[i].round()) : int(bounds[i + 1].round())])
    return [torch.cat(p).sort().values for p in parts]


class ShiftAugment(Dataset):
    """Random translations by up to ``max_shift`` pixels (zero padding), a light augmentation for digits."""

    def __init__(self, dataset: TensorDataset, max_shift: int) -> None:
        self.dataset, self.max_shift = dataset, max_shift

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset[index]
        if self.max_shift:
            dx, dy = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            x = torch.roll(F.pad(x, [self.max_shift] * 4, value=-1.0), shifts=(dy, dx), dims=(1, 2))
            x = x[:, self.max_shift : -self.max_shift, self.max_shift : -self.max_shift]
        return x, y


class DigitsProbe(ProbeData):
    """The old-domain probe: bank = the images the backbone was pretrained on, queries = held-out ones.

    Args:
        digits: the old-domain digits.
        image_size: side of the network input.
        query_fraction: share of each class held out as queries.
        split_seed: seed of the bank/query split.
    """

    name = "digits-old"

    def __init__(
        self,
        digits: Sequence[int] = OLD_DIGITS,
        image_size: int = 32,
        query_fraction: float = 0.3,
        split_seed: int = 0,
    ) -> None:
        if not 0.0 < query_fraction < 1.0:
            raise ValueError(f"query_fraction={query_fraction} must be in (0, 1)")
        self.digits, self.image_size = list(digits), image_size
        self.query_fraction, self.split_seed = query_fraction, split_seed
        self._bank: Dataset | None = None
        self._queries: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.digits)

    def setup(self) -> None:
        if self._bank is not None:
            return
        x, y = load_digit_images(self.digits, self.image_size)
        bank, queries = split_indices(y, [1.0 - self.query_fraction, self.query_fraction], self.split_seed)
        self.bank_tensors = (x[bank], y[bank])
        self.query_tensors = (x[queries], y[queries])
        self._bank = IndexedDataset(TensorDataset(*self.bank_tensors))
        self._queries = IndexedDataset(TensorDataset(*self.query_tensors))

    def bank_dataset(self) -> Dataset:
        self.setup()
        return self._bank

    def query_dataset(self) -> Dataset:
        self.setup()
        return self._queries

    def cache_key(self) -> str:
        text = f"digits:{self.digits}:{self.image_size}:{self.query_fraction}:{self.split_seed}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]


class DigitsDataModule(FineTuneDataModule):
    """The new task of the miniature: classify the new-domain digits; the old domain is the probe.

    Args:
        new_digits: digits of the new task (labels ``0..len-1`` in this order).
        old_digits: digits of the old domain, measured by the probe; ``[]`` for no probe.
        image_size: side of the network input.
        batch_size: global batch size.
        num_workers: loader workers per process (0 is fastest for this in-memory data).
        split_seed: seed of the train/val/test split (60/20/20 per class).
        max_shift: random translation of training images, in pixels.
    """

    def __init__(
        self,
        new_digits: list[int] | None = None,
        old_digits: list[int] | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        split_seed: int = 0,
        max_shift: int = 2,
    ) -> None:
        new_digits = list(NEW_DIGITS if new_digits is None else new_digits)
        old_digits = list(OLD_DIGITS if old_digits is None else old_digits)
        if set(new_digits) & set(old_digits):
            raise ValueError(
                f"data.new_digits {new_digits} and data.old_digits {old_digits} must not overlap"
            )
        probe = DigitsProbe(old_digits, image_size, split_seed=split_seed) if old_digits else None
        super().__init__(batch_size, num_workers, probe)
        self.save_hyperparameters()
        self.new_digits = new_digits
        self.num_classes = len(new_digits)

    def build_datasets(self) -> dict[str, Dataset]:
        hp = self.hparams
        x, y = load_digit_images(self.new_digits, hp.image_size)
        train, val, test = split_indices(y, [0.6, 0.2, 0.2], hp.split_seed)
        return {
            "train": ShiftAugment(TensorDataset(x[train], y[train]), hp.max_shift),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(x[test], y[test]),
        }


class DigitsBankDataModule(FineTuneDataModule):
    """The miniature's pretraining task: classify the old digits of the probe's bank, the images the
    probe's k-NN later searches (as DINO's backbone was pretrained on ImageNet-1k's train set).

    Args:
        digits: the old-domain digits.
        image_size: side of the network input.
        split_seed: seed of the probe's bank/query split (the same as the probe's).
        batch_size: global batch size.
        max_shift: random translation of training images, in pixels.
    """

    def __init__(
        self,
        digits: list[int] | None = None,
        image_size: int = 32,
        split_seed: int = 0,
        batch_size: int = 64,
        max_shift: int = 2,
    ) -> None:
        super().__init__(batch_size, num_workers=0)
        self.bank_probe = DigitsProbe(
            list(OLD_DIGITS if digits is None else digits), image_size, split_seed=split_seed
        )
        self.num_classes = self.bank_probe.num_classes
        self.max_shift = max_shift

    def bank_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All bank images and labels, unaugmented."""
        self.bank_probe.setup()
        return self.bank_probe.bank_tensors

    def build_datasets(self) -> dict[str, Dataset]:
        images, labels = self.bank_tensors()
        queries = TensorDataset(*self.bank_probe.query_tensors)
        return {
            "train": ShiftAugment(TensorDataset(images, labels), self.max_shift),
            "val": queries,
            "test": queries,
        }
