"""What every new-task image data module shares: the held-out val split, the transforms, the normalisation
(by default the backbone's own pretrained mean/std), and the one-line error for missing data.

A subclass says how to load one stored split (:meth:`NewTaskDataModule.load_split`), which files it
expects, and how many classes there are; :meth:`NewTaskDataModule.build_datasets` does the rest.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2 as T

from ftforget.data.base import FineTuneDataModule
from ftforget.data.probe import ProbeData
from ftforget.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ftforget.machine import default_num_workers

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}

#: a normalisation: a name in :data:`NORMALIZATIONS`, or the ``(mean, std)`` itself
Stats = str | tuple[Sequence[float], Sequence[float]]


def _stats(normalization: Stats) -> tuple[Sequence[float], Sequence[float]]:
    return NORMALIZATIONS[normalization] if isinstance(normalization, str) else normalization


def train_transform(size: int, scale: tuple[float, float], normalization: Stats) -> T.Compose:
    """The paper's augmentation: RandomResizedCrop of the small image to ``size``, horizontal flip."""
    mean, std = _stats(normalization)
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=scale, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(size: int, normalization: Stats) -> T.Compose:
    """The paper's evaluation transform: Resize to ``size``."""
    mean, std = _stats(normalization)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((size, size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def holdout_split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed-seed (train, val) split of ``range(n)``; the same for every process and every run."""
    if not 0 < val_size < n:
        raise ValueError(
            f"data.val_size={val_size} must be between 1 and the training set size - 1 ({n - 1})"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])


#: ``normalization`` values: the backbone's pretrained mean/std, or a fixed pair (:data:`NORMALIZATIONS`)
NORMALIZATION_CHOICES = ("backbone", *NORMALIZATIONS)


def backbone_input_size(backbone: str | None) -> int:
    """The input side that timm's pretrained config of ``backbone`` names (224; DINOv2: 518).

    Raises:
        ValueError: no backbone name was given, or timm knows no pretrained config for it.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone) if backbone else None
    if cfg is None or not cfg.input_size:
        raise ValueError(
            f"data.image_size=null follows the backbone's input size, but timm has no pretrained config for "
            f"data.backbone={backbone!r} (linked from model.init_args.backbone): set data.image_size"
        )
    return int(cfg.input_size[-1])


def backbone_stats(backbone: str | None) -> tuple[Sequence[float], Sequence[float]]:
    """The mean/std that timm's pretrained config of ``backbone`` (e.g. ``vit_base_patch16_224.dino``) names.

    Raises:
        ValueError: no backbone name was given, or timm knows no pretrained config for it.
    """
    from timm.models import get_pretrained_cfg

    if not backbone:
        raise ValueError(
            "data.normalization='backbone' needs the backbone's name (data.backbone, linked from "
            "model.init_args.backbone): set it, or choose data.normalization 'imagenet' or 'half'"
        )
    cfg = get_pretrained_cfg(backbone)
    if cfg is None or cfg.mean is None or cfg.std is None:
        raise ValueError(
            f"data.normalization='backbone': timm has no pretrained config (mean/std) for {backbone!r}; "
            "choose data.normalization 'imagenet' or 'half'"
        )
    return tuple(cfg.mean), tuple(cfg.std)


class DataNotFoundError(FileNotFoundError):
    """A dataset is missing (or corrupt) under its root; the message is one line naming the folder and fix."""


class NewTaskDataModule(FineTuneDataModule):
    """A new-task image dataset with ``train``/``val``/``test`` splits, fine-tuned with the paper's recipe.

    Where the dataset has no validation split, ``val_size`` training images are held out for it (a fixed
    ``split_seed``: the same images in every process and every run); the test split is only used by
    ``ftforget test``.

    Args:
        root: folder that holds (or, with ``download``, will receive) the dataset.
        download: download the dataset into ``root`` if it is not there (needs internet access; only
            datasets that torchvision can download).
        batch_size: the global batch size; each of the ``world_size`` processes loads
            ``batch_size / world_size``.
        num_workers: data-loading worker processes per training process (default: ``min(8, cores - 1)``).
        val_size: training images held out for validation; unused where the dataset has its own val split.
        split_seed: seed of the held-out split.
        image_size: side of the network input; ``None``: the backbone's (``ftforget fit`` tells the data
            the built model's input size; otherwise timm's pretrained config of ``backbone``).
        crop_scale: RandomResizedCrop scale range (the paper's augmentation: RandomResizedCrop, flip).
        normalization: ``backbone`` (the mean/std of ``backbone``'s pretrained config in timm),
            ``imagenet`` (ImageNet's mean/std) or ``half`` (0.5/0.5).
        backbone: the timm name of the backbone; ``ftforget fit`` links it from ``model.init_args.backbone``.
        probe: the forgetting probe (e.g. ImageNet-1k) that ``ForgettingCallback`` measures on.
    """

    #: the dataset's name in messages
    title: str = "dataset"
    #: whether ``download`` can fetch it
    downloadable: bool = False

    def __init__(
        self,
        root: str,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = default_num_workers(),  # noqa: B008 (evaluated once: the machine)
        val_size: int = 5000,
        split_seed: int = 0,
        image_size: int | None = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        normalization: Literal["backbone", "imagenet", "half"] = "backbone",
        backbone: str | None = None,
        probe: ProbeData | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, probe)
        if normalization not in NORMALIZATION_CHOICES:
            raise ValueError(
                f"data.normalization={normalization!r}: choose from {sorted(NORMALIZATION_CHOICES)}"
            )
        if download and not self.downloadable:
            raise ValueError(f"data.download: {self.title} cannot be downloaded; point data.root at a copy")
        self.save_hyperparameters(ignore=["probe"])
        self.root = Path(root).expanduser()
        self._model_input_size: int | None = None

    # ------------------------------------------------------------------ what a dataset says
    @abstractmethod
    def load_split(self, split: str, transform: T.Compose) -> Dataset | None:
        """One stored split (``train``, ``val`` or ``test``), or ``None`` where the dataset has none.

        Raises:
            RuntimeError | FileNotFoundError: the files are missing or corrupt (reported by :meth:`load`).
        """

    @abstractmethod
    def expected_files(self) -> str:
        """The files the dataset needs under ``root``, for the missing-data message."""

    def download_data(self) -> None:
        """Downloads the dataset into ``root`` (datasets with ``downloadable`` only)."""

    # ------------------------------------------------------------------ shared
    def match_input_size(self, size: int) -> None:
        """Told the built model's input side (by ``ftforget fit``/``test``); used where ``image_size`` is None."""
        self._model_input_size = size

    def input_side(self) -> int:
        """The side images are resized/cropped to: ``image_size``, else the model's, else the backbone's."""
        if self.hparams.image_size is not None:
            return int(self.hparams.image_size)
        return self._model_input_size or backbone_input_size(self.hparams.backbone)

    def normalization_stats(self) -> tuple[Sequence[float], Sequence[float]]:
        """The mean/std the transforms normalise with."""
        normalization = self.hparams.normalization
        if normalization == "backbone":
            return backbone_stats(self.hparams.backbone)
        return NORMALIZATIONS[normalization]

    def not_found(self, detail: str) -> DataNotFoundError:
        """The one-line error for missing data: the folder, the files expected there, ``detail``, the fix."""
        how = (
            "Download it with --data.download true (needs internet), or point --data.root at a copy."
            if self.downloadable
            else "Point --data.root at a copy in that layout."
        )
        return DataNotFoundError(
            f"{self.title} not found (or corrupt) under data.root={str(self.root)!r}: expected "
            f"{self.expected_files()} ({' '.join(detail.split())}). {how}"
        )

    def load(self, split: str, transform: T.Compose) -> Dataset | None:
        """:meth:`load_split`, with missing or corrupt files reported in one line naming the folder."""
        try:
            return self.load_split(split, transform)
        except (RuntimeError, FileNotFoundError) as err:
            raise self.not_found(str(err)) from err

    def prepare_data(self) -> None:
        if self.hparams.download:
            self.download_data()

    def check_inputs(self, stage: str) -> None:
        if self.hparams.download:
            return  # Lightning's prepare_data downloads it first (on one process per node)
        super().check_inputs(stage)

    def build_datasets(self) -> dict[str, Dataset]:
        hp = self.hparams
        stats = self.normalization_stats()
        size = self.input_side()
        train_tf = train_transform(size, tuple(hp.crop_scale), stats)
        eval_tf = eval_transform(size, stats)
        train, val = self.load("train", train_tf), self.load("val", eval_tf)
        if train is None:
            raise self.not_found("no training split")
        if val is None:  # held out of the training images, seen with the eval transform
            train_idx, val_idx = holdout_split(len(train), hp.val_size, hp.split_seed)  # type: ignore[arg-type]
            train, val = Subset(train, train_idx), Subset(self.load("train", eval_tf), val_idx)
        test = self.load("test", eval_tf)
        if test is None:
            raise self.not_found("no test split")
        return {"train": train, "val": val, "test": test}
