"""Files written atomically: a temporary file in the destination's own directory, flushed and fsynced,
then renamed over the destination with :func:`os.replace`, so a reader sees the old file or the new one,
never a part of either, and a failed write (a kill, a full disk) leaves the old file as it was. The rename
never crosses a file system (a temporary file in ``$TMPDIR`` would: the move then copies and truncates).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

#: suffix of the temporary files (hidden, and not ``*.ckpt``: never mistaken for a checkpoint)
TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block ends without an exception.

    Whatever goes wrong in the block (an ``OSError`` such as ``ENOSPC``, a ``KeyboardInterrupt``) removes
    the temporary file and leaves ``path`` untouched.

    Args:
        path: the destination file.

    Yields:
        The temporary path to write (already created, empty).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Writes ``path`` atomically: ``write(f)`` fills a temporary file that is flushed, fsynced and renamed.

    Args:
        path: the destination file.
        write: called with the open binary temporary file.
    """
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copies ``src`` to ``dest`` atomically (``dest`` is never truncated in place)."""
    with open(src, "rb") as source:
        atomic_write(dest, lambda f: shutil.copyfileobj(source, f))


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Appends ``record`` as one JSON line to ``path``, atomically (the file is rewritten, then renamed)."""
    old = Path(path).read_bytes() if Path(path).is_file() else b""
    atomic_write(path, lambda f: f.write(old + (json.dumps(record) + "\n").encode()))
