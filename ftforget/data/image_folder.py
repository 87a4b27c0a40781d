"""Any image-folder dataset as a new task: ``root/train/<class>/*``, optional ``val/`` and ``test/`` trees."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import v2 as T

from ftforget.data.image_folders import ImageListDataset
from ftforget.data.new_task import NewTaskDataModule


class ImageFolderDataModule(NewTaskDataModule):
    """Class trees under ``root``: ``train/<class>/*.jpg`` (required), ``val/<class>/*`` (optional: held out
    of train when absent) and ``test/<class>/*`` (required). Classes are ``train/``'s sub-folders in sorted
    order; ``val/`` and ``test/`` may lack some but hold no other. The arguments are
    :class:`~ftforget.data.new_task.NewTaskDataModule`'s (``download`` must stay false)."""

    title = "Image-folder dataset"

    @cached_property
    def classes(self) -> list[str]:
        """The sorted class folders of ``train/``."""
        train = self.root / "train"
        if not train.is_dir():
            raise self.not_found(f"no folder {str(train)!r}")
        classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise self.not_found(f"{str(train)!r} has no class sub-folders")
        return classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def expected_files(self) -> str:
        return "'train/<class>/*.jpg', optional 'val/<class>/*' and 'test/<class>/*'"

    def load_split(self, split: str, transform: T.Compose) -> Dataset | None:
        folder: Path = self.root / split
        if not folder.is_dir():
            if split == "val":
                return None
            raise FileNotFoundError(f"no folder {str(folder)!r}")
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [name for name in unknown if name not in self.classes]
        if unknown:
            raise ValueError(f"{self.title}: {str(folder)!r} has classes that 'train/' lacks: {unknown[:5]}")
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = make_dataset(
            str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=split != "train"
        )
        if not samples:
            raise FileNotFoundError(f"{str(folder)!r} holds no images")
        return ImageListDataset(samples, transform)
