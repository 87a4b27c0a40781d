"""Pre-decoded probe pixels: the center-cropped uint8 images of a probe, in one memory-mapped file.

A forgetting measurement over ImageNet-1k decodes and resizes every JPEG of the bank and the queries,
every time. The eval transform is deterministic up to the crop, so the cropped uint8 pixels can be stored
once and memory-mapped: a later measurement then costs no JPEG decoding. What the cache stores is exactly
what :func:`crop_transform` gives, and :func:`to_normalized_tensor` turns it into the same float tensor as
the JPEG path (a test checks the pixels and the accuracy are identical).

Files, for a prefix ``P``: ``P.u8`` (``N x crop x crop x 3`` uint8, row-major, no header) and ``P.json``
(``{"n", "size", "labels"}``), written last, so a half-built cache is never taken for a complete one.
A cache that cannot be used (garbage JSON, other keys, a ``.u8`` of the wrong size, other labels) is
reported by :func:`open_pixel_cache` with a warning naming the file, and rebuilt by the caller.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ftforget.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor
from ftforget.machine import default_num_workers
from ftforget.progress import progress_bar

log = logging.getLogger(__name__)


class ToUint8Array:
    """PIL image to a ``(H, W, 3)`` uint8 tensor (a class, not a lambda, so loader workers can pickle it)."""

    def __call__(self, image: object) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def cache_complete(prefix: Path) -> bool:
    return prefix.with_suffix(".json").is_file() and prefix.with_suffix(".u8").is_file()


def build_pixel_cache(
    dataset: Dataset, labels: list[int], crop_size: int, prefix: Path, num_workers: int | None = None
) -> None:
    """Decodes ``dataset`` (items ``(uint8 HWC tensor, label)``) once into ``prefix.u8`` / ``prefix.json``.

    Several processes may build the same cache at once: each writes a private temporary file and the
    rename is atomic, so readers only ever see a complete cache. Progress: a bar on rank 0's terminal
    (:func:`~ftforget.progress.progress_bar`) and a log line every 20,000 images.

    Args:
        dataset: the decoded, cropped images in cache order.
        labels: their labels.
        crop_size: the side of each image.
        prefix: the cache's path without suffix.
        num_workers: decoding workers (None: :func:`~ftforget.machine.default_num_workers`).
    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    tmp = prefix.parent / f".{prefix.name}.{os.getpid()}.u8"
    array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, crop_size, crop_size, 3))
    workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, shuffle=False)
    start, cursor = time.perf_counter(), 0
    with progress_bar(n, f"pixel cache {prefix.name}") as bar:
        for images, _ in loader:
            array[cursor : cursor + len(images)] = images.numpy()
            cursor += len(images)
            bar.update(len(images))
            if cursor % 20_000 < len(images):
                log.info("pixel cache %s: %d / %d images (%.0f images/s)", prefix.name, cursor, n,
                         cursor / (time.perf_counter() - start))  # fmt: skip
    if cursor != n:
        raise RuntimeError(f"pixel cache {str(prefix)!r}: decoded {cursor} images, expected {n}")
    array.flush()
    del array
    os.replace(tmp, prefix.with_suffix(".u8"))
    meta = {"n": n, "size": crop_size, "labels": [int(x) for x in labels]}
    tmp_json = prefix.parent / f".{prefix.name}.{os.getpid()}.json"
    tmp_json.write_text(json.dumps(meta))
    os.replace(tmp_json, prefix.with_suffix(".json"))


def read_pixel_cache_meta(path: Path) -> tuple[int, list[int]]:
    """``(size, labels)`` from a pixel cache's JSON file, checked.

    Raises:
        ValueError: the file is not JSON of the form ``{"n", "size", "labels"}``; the message names it.
    """
    try:
        meta = json.loads(path.read_text())
        size, labels = int(meta["size"]), [int(x) for x in meta["labels"]]
        if size < 1 or int(meta["n"]) != len(labels):
            raise ValueError(f"size {size}, n {meta['n']} for {len(labels)} labels")
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(
            f"pixel cache file {str(path)!r} is unreadable ({type(err).__name__}: {err}); delete it to rebuild "
            'the cache (expected JSON {"n", "size", "labels"})'
        ) from None
    return size, labels


def open_pixel_cache(prefix: Path, labels: list[int], crop_size: int) -> PixelCacheDataset | None:
    """The complete, readable pixel cache at ``prefix`` holding ``labels`` at ``crop_size``, else None.

    A cache that exists but cannot be used (garbage JSON, a ``.u8`` of the wrong size, other labels or
    size) is logged as a warning naming the file; the caller then rebuilds it.
    """
    if not cache_complete(prefix):
        return None
    try:
        dataset = PixelCacheDataset(prefix)
        if dataset.size != crop_size or dataset.labels != list(labels):
            raise ValueError(
                f"pixel cache file {str(prefix.with_suffix('.json'))!r} holds {len(dataset.labels)} images of "
                f"{dataset.size} px, expected {len(labels)} of {crop_size} px with the same labels"
            )
    except (OSError, ValueError) as err:
        log.warning("rebuilding the pixel cache %s: %s", prefix, err)
        return None
    return dataset


class PixelCacheDataset(Dataset):
    """``(normalised image, label)`` items from a pixel cache, identical to the JPEG path's.

    Raises:
        FileNotFoundError: the cache is incomplete.
        ValueError: its JSON is unreadable or its ``.u8`` has the wrong size; the message names the file.
    """

    def __init__(self, prefix: Path) -> None:
        if not cache_complete(prefix):
            raise FileNotFoundError(f"pixel cache {str(prefix)!r}: {prefix.name}.u8/.json not found")
        self.size, self.labels = read_pixel_cache_meta(prefix.with_suffix(".json"))
        self.prefix = prefix
        #: the normalisation of the items (the probe sets the measured backbone's)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        expected = len(self.labels) * self.size * self.size * 3
        actual = prefix.with_suffix(".u8").stat().st_size
        if actual != expected:
            raise ValueError(
                f"pixel cache {str(prefix.with_suffix('.u8'))!r} has {actual} bytes, expected {expected}"
            )
        self._array: np.memmap | None = None  # opened lazily: a memmap is per process (loader workers)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._array is None:
            shape = (len(self.labels), self.size, self.size, 3)
            self._array = np.memmap(self.prefix.with_suffix(".u8"), dtype=np.uint8, mode="r", shape=shape)
        return to_normalized_tensor(np.array(self._array[index]), self.mean, self.std), self.labels[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}
