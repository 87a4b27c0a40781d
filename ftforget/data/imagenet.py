"""The ImageNet-1k forgetting probe: val images as queries, train images (or a per-class subset) as the bank.

Accepted layouts (``root`` holds ``train/`` and ``val/``, or give the directories one by one):

- ``train/<wnid>/*.JPEG`` for the bank (always a class tree);
- ``val/<wnid>/*.JPEG`` (an ImageFolder tree), or the official flat ``val/*.JPEG`` plus a labels file in
  the Kaggle/ILSVRC ``LOC_val_solution.csv`` format (header ``ImageId,PredictionString``; the prediction
  string starts with the wnid).

:meth:`ImageNetProbe.setup` checks the tree structure and the class sets up-front, so a wrong path fails
before training with the path in the message; checking 1.28M files one by one would take too long, so an
unreadable image is reported, by file name, when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset
from torchvision import transforms

from ftforget.data.image_folders import (
    ImageListDataset,
    list_images,
    scan_class_tree,
    scan_flat_val,
)
from ftforget.data.pixel_cache import (
    ToUint8Array,
    build_pixel_cache,
    open_pixel_cache,
)
from ftforget.data.probe import IndexedDataset, ProbeData, draw_per_class
from ftforget.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_transform, eval_transform

log = logging.getLogger(__name__)

#: what identifies an image file in the cache key, besides its relative name (see ``cache_identity``)
CACHE_IDENTITIES = ("stat", "size", "content")


def file_identity(path: str, how: str) -> str:
    """``path``'s identity for a cache key: ``"<size>:<mtime ns>"``, ``"<size>"`` or its bytes' SHA-256.

    Raises:
        FileNotFoundError: the file vanished since the tree was scanned (the message names it).
    """
    try:
        if how == "content":
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            return digest.hexdigest()
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"ImageNet probe: image file {path!r} vanished after the scan") from None
    return f"{st.st_size}:{st.st_mtime_ns}" if how == "stat" else str(st.st_size)


def file_identities(paths: list[str], how: str, threads: int = 16, chunk: int = 4096) -> list[str]:
    """:func:`file_identity` of every path, in order; chunks on ``threads`` threads (``stat`` and reads
    release the GIL: on a network file system the latencies overlap)."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    if len(chunks) <= 1:
        return [file_identity(p, how) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = pool.map(lambda part: [file_identity(p, how) for p in part], chunks)
        return [i for part in parts for i in part]


class ImageNetProbe(ProbeData):
    """ImageNet-1k k-NN probe (DINO protocol).

    Args:
        root: directory with ``train/`` and ``val/`` (either may be overridden below).
        train_dir: the train tree ``<wnid>/*.JPEG`` the bank is drawn from (default ``root/train``).
        val_dir: the val images, a ``<wnid>/*.JPEG`` tree or flat (default ``root/val``).
        val_labels: labels of a flat ``val_dir`` (``LOC_val_solution.csv`` format); must be None for a tree.
        bank_per_class: bank = this many train images per class (fixed-seed subset); None: all of train.
        queries_per_class: queries = this many val images per class (quick curves); None: all of val.
        seed: seed of both subsets (:func:`~ftforget.data.probe.draw_per_class`: consecutive seeds give
            disjoint subsets while the classes have enough images). For several draws measured together,
            with their spread, use the callback's or ``ftforget fidelity``'s ``subset`` option instead.
        resize_size: shorter side after the bicubic resize (None: ``crop_size * 256 / 224``, DINO's ratio).
        crop_size: center crop (None: the input size of the measured model, else 224).
        normalization: ``backbone``: the mean/std of the measured backbone's pretrained config in timm
            (ImageNet's for DINO, DINOv2, MAE, DeiT; CLIP's own; 0.5/0.5 for the supervised AugReg ViTs),
            told by the forgetting callback and ``ftforget measure``; ``imagenet``: ImageNet's always.
        pixel_cache_dir: keep the center-cropped uint8 pixels of bank and queries in memory-mapped files
            here (built on first use: ~150 KB per image at 224 px), so later measurements decode no JPEG.
        cache_identity: what identifies an image file in :meth:`cache_key` (the key of the pixel cache and
            of the feature cache), besides its name relative to the tree: ``"stat"`` (default) its size
            and modification time, one ``stat`` per file (a copy keeps the key only if it keeps the times:
            ``rsync -a``, ``cp -p``); ``"size"`` its size alone (a copy that loses the times still shares
            the cache; an edit that keeps the size does too); ``"content"`` a SHA-256 of its bytes (exact,
            but reads every file: minutes for ImageNet).
    """

    name = "imagenet1k"

    def __init__(
        self,
        root: str | None = None,
        train_dir: str | None = None,
        val_dir: str | None = None,
        val_labels: str | None = None,
        bank_per_class: int | None = None,
        queries_per_class: int | None = None,
        seed: int = 0,
        resize_size: int | None = None,
        crop_size: int | None = None,
        normalization: Literal["backbone", "imagenet"] = "backbone",
        pixel_cache_dir: str | None = None,
        cache_identity: str = "stat",
    ) -> None:
        if cache_identity not in CACHE_IDENTITIES:
            raise ValueError(
                f"ImageNet probe: cache_identity must be one of {', '.join(CACHE_IDENTITIES)}, got {cache_identity!r}"
            )
        if root is None and (train_dir is None or val_dir is None):
            raise ValueError("ImageNet probe: give root, or both train_dir and val_dir")
        for option, value in (("bank_per_class", bank_per_class), ("queries_per_class", queries_per_class)):
            if value is not None and value < 1:
                raise ValueError(f"ImageNet probe: {option} must be >= 1 or None, got {value}")
        self.root = Path(root).expanduser() if root is not None else None
        self.train_dir = Path(train_dir).expanduser() if train_dir else self.root / "train"  # type: ignore[operator]
        self.val_dir = Path(val_dir).expanduser() if val_dir else self.root / "val"  # type: ignore[operator]
        self.val_labels = Path(val_labels).expanduser() if val_labels else None
        self.bank_per_class, self.queries_per_class, self.seed = bank_per_class, queries_per_class, seed
        if normalization not in ("backbone", "imagenet"):
            raise ValueError(
                f"ImageNet probe: normalization must be 'backbone' or 'imagenet', got {normalization!r}"
            )
        self._sizes = (resize_size, crop_size)
        self.normalization = normalization
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.resize_size, self.crop_size = self._resolve_sizes(None)
        self.pixel_cache_dir = Path(pixel_cache_dir).expanduser() if pixel_cache_dir else None
        self.cache_identity = cache_identity
        self.classes: list[str] = []
        self._bank: list[tuple[str, int]] = []
        self._queries: list[tuple[str, int]] = []
        self._cache_key = ""

    def _resolve_sizes(self, model_size: int | None) -> tuple[int, int]:
        resize, crop = self._sizes
        crop = crop or model_size or 224
        resize = resize or round(crop * 256 / 224)
        if not 0 < crop <= resize:
            raise ValueError(f"ImageNet probe: need 0 < crop_size <= resize_size, got {crop} and {resize}")
        return resize, crop

    @property
    def transform(self) -> transforms.Compose:
        return eval_transform(self.resize_size, self.crop_size, self.mean, self.std)

    def match_input_size(self, size: int) -> None:
        """The crop follows the model's input size unless ``crop_size`` was given."""
        if self.classes and (self.resize_size, self.crop_size) != self._resolve_sizes(size):
            raise RuntimeError("ImageNetProbe.match_input_size must be called before setup()")
        self.resize_size, self.crop_size = self._resolve_sizes(size)

    def match_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """With ``normalization="backbone"``, the measured backbone's mean/std replace ImageNet's."""
        if self.normalization != "backbone":
            return
        if self.classes and (self.mean, self.std) != (tuple(mean), tuple(std)):
            raise RuntimeError("ImageNetProbe.match_normalization must be called before setup()")
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def num_classes(self) -> int:
        self._require_setup()
        return len(self.classes)

    def setup(self) -> None:
        """Scans and checks both trees (structure, class sets, labels file); idempotent."""
        if self.classes:
            return
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet probe: root directory {str(self.root)!r} does not exist")
        train = scan_class_tree(self.train_dir, "train")
        if self.val_labels is not None:
            val = scan_flat_val(self.val_dir, self.val_labels)
        elif self.val_dir.is_dir() and list_images(self.val_dir):
            raise ValueError(
                f"ImageNet probe: val directory {str(self.val_dir)!r} holds images directly (the official flat "
                "layout); pass val_labels (LOC_val_solution.csv) or arrange it as val/<wnid>/*.JPEG"
            )
        else:
            val = scan_class_tree(self.val_dir, "val")
        self._check_classes(set(train), set(val))
        classes = sorted(train)
        index = {wnid: i for i, wnid in enumerate(classes)}
        bank = draw_per_class(train, self.bank_per_class, self.seed, "bank")
        queries = draw_per_class(val, self.queries_per_class, self.seed, "queries")
        self._bank = [(p, index[w]) for w in classes for p in bank[w]]
        self._queries = [(p, index[w]) for w in classes for p in queries[w]]
        self.classes = classes
        stats = "the backbone's" if self.normalization == "backbone" else "ImageNet's"
        log.info(f"ImageNet probe: {len(classes)} classes, bank {len(self._bank)} images from {self.train_dir}, "
                 f"{len(self._queries)} queries from {self.val_dir}; resize {self.resize_size}, crop "
                 f"{self.crop_size}, mean {tuple(round(m, 4) for m in self.mean)} std "
                 f"{tuple(round(v, 4) for v in self.std)} ({stats}: check they are your weights' own)")  # fmt: skip

    def _check_classes(self, train: set[str], val: set[str]) -> None:
        val_source = str(self.val_labels or self.val_dir)
        for have, lack, have_dir, lack_dir in (
            (train, val, self.train_dir, val_source),
            (val, train, val_source, self.train_dir),
        ):
            extra = sorted(have - lack)
            if extra:
                raise ValueError(
                    f"ImageNet probe: {len(extra)} classes of {str(have_dir)!r} are absent from {str(lack_dir)!r}, "
                    f"e.g. {extra[:5]}; bank and queries must have the same classes"
                )

    def bank_dataset(self) -> Dataset:
        self._require_setup()
        return IndexedDataset(self._images("bank", self._bank))

    def query_dataset(self) -> Dataset:
        self._require_setup()
        return IndexedDataset(self._images("queries", self._queries))

    def bank_labels(self) -> list[int]:
        self._require_setup()
        return [label for _, label in self._bank]

    def query_labels(self) -> list[int]:
        self._require_setup()
        return [label for _, label in self._queries]

    def subset_datasets(self, bank: Sequence[int], queries: Sequence[int]) -> tuple[Dataset, Dataset]:
        """Only the chosen images: with ``pixel_cache_dir``, a pixel cache of the subset alone (its name
        holds a hash of the positions), not of all 1.33M images."""
        self._require_setup()
        parts = []
        for part, samples, chosen in (("bank", self._bank, bank), ("queries", self._queries, queries)):
            tag = hashlib.sha256(",".join(map(str, chosen)).encode()).hexdigest()[:16]
            parts.append(IndexedDataset(self._images(f"{part}-subset-{tag}", [samples[i] for i in chosen])))
        return parts[0], parts[1]

    def _images(self, part: str, samples: list[tuple[str, int]]) -> Dataset:
        if self.pixel_cache_dir is None:
            return ImageListDataset(samples, self.transform)
        prefix = self.pixel_cache_dir / f"{self.cache_key()}-{part}"
        labels = [label for _, label in samples]
        cached = open_pixel_cache(prefix, labels, self.crop_size)
        if cached is not None:
            cached.mean, cached.std = self.mean, self.std
            return cached
        log.info(f"ImageNet probe: building the pixel cache {prefix} ({len(samples)} images)")
        decode = transforms.Compose([crop_transform(self.resize_size, self.crop_size), ToUint8Array()])
        build_pixel_cache(ImageListDataset(samples, decode), labels, self.crop_size, prefix)
        rebuilt = open_pixel_cache(prefix, labels, self.crop_size)
        if rebuilt is None:
            raise RuntimeError(f"ImageNet probe: the pixel cache {str(prefix)!r} just built is unreadable")
        rebuilt.mean, rebuilt.std = self.mean, self.std
        return rebuilt

    def cache_key(self) -> str:
        """Hash of the chosen files (relative names, labels, identities) and the transform.

        Relative names let a copy of ImageNet elsewhere (e.g. node-local disk) reuse the cache; each file
        also enters with its identity (``cache_identity``: size and modification time by default), so two
        trees with the same names but other pixels never share a pixel-cache or feature-cache entry.
        Computed once per probe (one ``stat`` per chosen file, on 16 threads for network file systems).
        """
        self._require_setup()
        if self._cache_key:
            return self._cache_key
        digest = hashlib.sha256()
        for part, samples, base in (
            ("bank", self._bank, self.train_dir),
            ("queries", self._queries, self.val_dir),
        ):
            digest.update(f"{part}:{len(samples)}:{self.cache_identity}\n".encode())
            cut = len(str(base)) + 1  # every path was built as str(base / ...): slicing is relpath, faster
            ids = file_identities([path for path, _ in samples], self.cache_identity)
            digest.update(
                "".join(
                    f"{path[cut:]}\t{label}\t{i}\n" for (path, label), i in zip(samples, ids, strict=True)
                ).encode()
            )
        transform = {"resize": self.resize_size, "crop": self.crop_size, "interp": "bicubic"}
        digest.update(json.dumps(transform | {"mean": self.mean, "std": self.std}).encode())
        self._cache_key = f"{self.name}-{digest.hexdigest()[:32]}"  # 1.33M names: hash them once
        return self._cache_key

    def _require_setup(self) -> None:
        if not self.classes:
            raise RuntimeError("ImageNetProbe.setup() must be called first")
