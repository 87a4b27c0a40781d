"""Image folders on disk: class trees, the official flat ImageNet val folder and its labels file.

Layouts the ImageNet probe (and any image-folder data) accepts:

- ``<dir>/<class>/*.JPEG``: a class tree (:func:`scan_class_tree`);
- a flat folder of images plus a labels file in the Kaggle/ILSVRC ``LOC_val_solution.csv`` format
  (header ``ImageId,PredictionString``; the prediction string starts with the class id)
  (:func:`scan_flat_val`).

Every error names the directory or file (and line) at fault.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_CSV_HEADER = ["ImageId", "PredictionString"]


class UnreadableImageError(RuntimeError):
    """An image file could not be decoded; the message names the file."""


class ImageListDataset(Dataset):
    """``(image, label)`` items from a list of ``(path, label)``; decode errors name the file."""

    def __init__(self, samples: list[tuple[str, int]], transform: transforms.Compose) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(f"cannot read image file {path!r}: {err}") from err
        return self.transform(image), label


def list_images(directory: Path) -> list[str]:
    """Sorted image file names directly inside ``directory`` (hidden files skipped)."""
    with os.scandir(directory) as entries:  # DirEntry.is_file() needs no stat call on most file systems
        return sorted(
            e.name
            for e in entries
            if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )


def scan_class_tree(directory: Path, what: str) -> dict[str, list[str]]:
    """``wnid -> sorted image paths`` of a ``<dir>/<wnid>/*`` tree.

    Raises:
        FileNotFoundError: the directory is missing.
        ValueError: it has no class sub-directories, or a class directory holds no image.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"ImageNet probe: {what} directory {str(directory)!r} does not exist")
    with os.scandir(directory) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"ImageNet probe: {what} directory {str(directory)!r} has no class sub-directories "
            f"(expected {str(directory)!r}/<wnid>/*.JPEG)"
        )
    tree: dict[str, list[str]] = {}
    for wnid in classes:
        names = list_images(directory / wnid)
        if not names:
            raise ValueError(
                f"ImageNet probe: {what} class directory {str(directory / wnid)!r} contains no images"
            )
        tree[wnid] = [str(directory / wnid / n) for n in names]
    return tree


def read_val_labels(csv_path: Path) -> dict[str, str]:
    """``image id -> wnid`` from a ``LOC_val_solution.csv``-style file; errors name the file (and line)."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"ImageNet probe: val_labels file {str(csv_path)!r} does not exist")
    labels: dict[str, str] = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != _CSV_HEADER:
            raise ValueError(
                f"ImageNet probe: val_labels file {str(csv_path)!r} must start with the header "
                f"'ImageId,PredictionString' (LOC_val_solution.csv format), got {header!r}"
            )
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            words = row[1].split() if len(row) >= 2 else []
            if not row[0].strip() or not words:
                raise ValueError(
                    f"ImageNet probe: val_labels file {str(csv_path)!r} line {line_no} is malformed: {row!r}"
                )
            labels[row[0].strip()] = words[0]
    if not labels:
        raise ValueError(f"ImageNet probe: val_labels file {str(csv_path)!r} has no rows")
    return labels


def scan_flat_val(val_dir: Path, csv_path: Path) -> dict[str, list[str]]:
    """``wnid -> sorted image paths`` of a flat val folder labelled by a CSV file."""
    if not val_dir.is_dir():
        raise FileNotFoundError(f"ImageNet probe: val directory {str(val_dir)!r} does not exist")
    labels = read_val_labels(csv_path)
    files = {Path(name).stem: name for name in list_images(val_dir)}
    missing = sorted(set(labels) - set(files))
    if missing:
        raise ValueError(
            f"ImageNet probe: {len(missing)} images listed in {str(csv_path)!r} are not in {str(val_dir)!r}, "
            f"e.g. {missing[:5]}"
        )
    unlabelled = len(set(files) - set(labels))
    if unlabelled:
        log.warning(
            "ImageNet probe: %d images in %s have no label in %s; ignored", unlabelled, val_dir, csv_path
        )
    tree: dict[str, list[str]] = {}
    for image_id in sorted(labels):
        tree.setdefault(labels[image_id], []).append(str(val_dir / files[image_id]))
    return tree


def subset_per_class(tree: dict[str, list[str]], n: int | None, seed: int) -> dict[str, list[str]]:
    """At most ``n`` images per class, drawn with a per-class seed so a class's pick never depends on others."""
    if n is None:
        return tree
    # A str seed is hashed with SHA-512 by ``random``: the pick is the same in every process and run.
    return {
        wnid: sorted(random.Random(f"{seed}:{wnid}").sample(paths, min(n, len(paths))))
        for wnid, paths in tree.items()
    }
