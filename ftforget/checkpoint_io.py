"""Checkpoint files written atomically: a temporary file in the destination's own directory, flushed and
fsynced, then renamed over the destination with :func:`os.replace`.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, whose temporary file lies in
``$TMPDIR``; when the run directory is on another file system, the commit is a copy that truncates the
old file first, so a kill during the copy (or a full disk) leaves ``last.ckpt`` empty. Here the rename
never crosses a file system: a reader sees the old file or the new one, never a part of either, and a
failed write removes its temporary file and leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from ftforget.files import TMP_SUFFIX, atomic_copy, atomic_target, atomic_write

__all__ = [
    "AtomicCheckpointIO",
    "atomic_copy",
    "atomic_symlink",
    "atomic_target",
    "atomic_write",
    "with_atomic_checkpoint_io",
]


def atomic_symlink(target: str, link: _PATH) -> None:
    """Points ``link`` at ``target`` (relative to the link's folder) by renaming a new link over it."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link{TMP_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local checkpoints are written atomically, in place.

    Remote paths (``s3://`` and other fsspec URLs) keep Lightning's own write.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Saves ``checkpoint`` to ``path`` through a temporary file in the same directory.

        Args:
            checkpoint: the state to save (anything :func:`torch.save` accepts).
            path: the destination file.
            storage_options: not supported, as in Lightning's ``TorchCheckpointIO``.

        Raises:
            TypeError: ``storage_options`` was given.
        """
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not supported: "
                "write a CheckpointIO of your own for them"
            )
        if "://" in str(path):  # a remote URL: no rename there that this could rely on
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``trainer.plugins`` as configured (None, one plugin or a list) plus :class:`AtomicCheckpointIO`,
    unless a ``CheckpointIO`` is among them already (a user's own wins)."""
    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in listed):
        listed.append(AtomicCheckpointIO())
    return listed
