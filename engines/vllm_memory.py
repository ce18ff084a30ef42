"""The vllm engine's GPU memory as colo checks it: the share at start-up, vLLM's sleep-mode allocator
before a new engine starts and before a wake, and the bytes that allocator holds awake or asleep.

Read from vLLM 0.33's CUDA source (``device_allocator/cumem.py``, ``v1/worker/gpu_worker.py``,
``v1/worker/utils.py``): every allocation vLLM makes while sleep mode is on goes through one
process-wide ``CuMemAllocator``, tagged ``weights``, ``kv_cache``, ``runtime`` or ``cudagraph``; sleep
unmaps them (backing some up to the host) and a wake maps every one back, each with ``cuMemCreate``.
"""

from __future__ import annotations

import gc
from typing import Any

from colo.errors import ConfigError, EngineError

GIB = 2**30
# vLLM checks its share against the memory free after its own start-up work (NCCL and cuBLAS set-up,
# its compile workspace: v1/worker/utils.py, "Free memory on device ... on startup is less than desired"),
# which colo cannot see beforehand: keep this much aside so a share colo accepts is one vLLM accepts
STARTUP_MARGIN_BYTES = 512 << 20


def check_memory_share(share: float, free: int, total: int) -> None:
    """vLLM takes ``share`` of the GPU's total memory, and it must be free now, beside the trainer's
    weights, with room for vLLM's own start-up work."""
    if share * total + STARTUP_MARGIN_BYTES > free:
        fits = max(int((free - STARTUP_MARGIN_BYTES) / total * 100) / 100, 0.0)
        raise ConfigError(f"COLO_GPU_MEMORY_UTILIZATION={share}: vLLM would take {share * total / GIB:.1f} GiB and "
                          f"{free / GIB:.1f} GiB of {total / GIB:.1f} GiB are free (the trainer holds the rest; "
                          f"{STARTUP_MARGIN_BYTES >> 20} MiB stay aside for vLLM's start-up); allowed: at most {fits}")


def sleep_allocator() -> Any | None:
    """vLLM's sleep-mode allocator if one exists in this process (never creates it); None on CPU."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except ImportError:  # builds without the cumem extension (CPU)
        return None
    return CuMemAllocator.instance


def awake_bytes(allocator) -> int:
    """Bytes the allocator has mapped on the GPU now."""
    return sum(d.handle[1] for d in allocator.pointer_to_data.values() if not d.is_asleep)


def asleep_bytes(allocator) -> int:
    """Bytes a full wake maps back: every allocation the allocator put to sleep."""
    return sum(d.handle[1] for d in allocator.pointer_to_data.values() if d.is_asleep)


def check_allocator_empty(allocator) -> None:
    """A new engine may start: vLLM allows one user of its sleep allocator per process, and asserts
    (a bare "CuMem allocator can only be used for one instance per process") when a previous engine
    left allocations behind. Objects vLLM froze out of the collector's reach are let back first."""
    if allocator is None or not allocator.pointer_to_data:
        return
    gc.unfreeze()
    gc.collect()
    left = sum(d.handle[1] for d in allocator.pointer_to_data.values())
    if left:
        raise EngineError(f"a previous vLLM engine in this process still holds {left / GIB:.2f} GiB in vLLM's "
                          f"sleep allocator ({len(allocator.pointer_to_data)} allocations), and vLLM allows one "
                          "engine per process; allowed: start the new engine in a new process")


def free_device_bytes() -> int | None:
    """GPU memory free for a wake: torch's cached free blocks are released first (vLLM's wake would release
    them itself before mapping); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def check_wake_memory(needed: int, free: int) -> None:
    """Waking maps ``needed`` bytes back; fail with both figures before vLLM fails halfway, inside
    ``cuMemCreate``, with a bare "CUDA Error: out of memory"."""
    if needed > free:
        raise EngineError(f"the vllm engine cannot wake: it needs {needed / GIB:.2f} GiB back and {free / GIB:.2f} "
                          "GiB are free (training holds the rest); it stays asleep. Allowed: free memory for it "
                          "(a smaller COLO_MICROBATCH_TOKENS, fewer live adapters) or a smaller "
                          "COLO_GPU_MEMORY_UTILIZATION")
