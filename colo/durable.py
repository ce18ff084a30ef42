"""Writing files so that a crash midway loses nothing: flush to disk, then swap in whole.

A file or directory is written beside its target under a temporary name, flushed, and renamed over
the target (atomic on POSIX), so the previous one stays readable until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(new: Path, target: Path) -> None:
    """Replace directory ``target`` by ``new``; the old one is removed only once the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
