"""The memory allocator of CPU training: which one is preloaded, and where colo's mimalloc is.

glibc's malloc keeps the freed mid-sized blocks of training (activations of 1-32 MB) fragmented in
its heap: one forward_backward peaked at 2.6x the memory it did under mimalloc, and ran slower
(BENCHMARKS.md, "The allocator"). An allocator can only be swapped before a process starts, through
LD_PRELOAD, so colo can find one and say so, not switch to it.
"""

from __future__ import annotations

import os

KNOWN = ("mimalloc", "tcmalloc", "jemalloc")  # allocators that return freed memory well


def preloaded() -> str:
    """The malloc replacement in LD_PRELOAD, or ``glibc malloc``."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in KNOWN if name in preload), "glibc malloc")


def mimalloc_path() -> str | None:
    """The mimalloc shared library of the ``cmeel-mimalloc`` package (colo's ``cpu`` extra), if installed."""
    try:
        import cmeel
    except ImportError:
        return None
    for root in cmeel.__path__:
        path = os.path.normpath(os.path.join(root, "..", "cmeel.prefix", "lib", "libmimalloc.so"))
        if os.path.exists(path):
            return path
    return None
