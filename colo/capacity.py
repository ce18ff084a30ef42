"""How many adapters may live at once: a count limit, and the memory each new one needs.

An adapter costs its LoRA weights several times over: the weights, their gradients, AdamW's two
moments, the undo snapshot ``optim_step`` takes, and the sampler's own copy. Creating one is refused,
with what it needs and what is free, when that would not fit in the training device's free memory
(host memory on CPU), so a flood of ``create_model`` calls ends in a clear error, not in the OOM
killer. How many adapters go into one engine batch is a different, smaller number (``COLO_MAX_LORAS``).
"""

from __future__ import annotations

import psutil
import torch

from colo.errors import InvalidRequestError

# weights, gradients, exp_avg, exp_avg_sq, the optim_step snapshot of weights and moments (3), the
# engine's copy: 8 copies of every LoRA value, in the adapter's own dtype
COPIES = 8
RESERVE_BYTES = 512 << 20  # left free for activations and the allocator's slack


def adapter_bytes(values: int, element_size: int) -> int:
    return values * element_size * COPIES


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_room(live: int, limit: int, values: int, element_size: int, device: torch.device) -> None:
    """Raise ``InvalidRequestError`` if one more adapter of ``values`` LoRA values does not fit."""
    if live >= limit:
        raise InvalidRequestError(f"{live} adapters are live; allowed: at most {limit} (COLO_MAX_ADAPTERS); "
                                  "delete one first (delete_lora, or the SDK's unload_model)")
    need, free = adapter_bytes(values, element_size), free_bytes(device)
    if need + RESERVE_BYTES > free:
        raise InvalidRequestError(
            f"a new adapter needs about {need / 2**20:.0f} MiB ({values:,} LoRA values x {COPIES} copies: weights, "
            f"gradients, AdamW state, undo snapshot, sampler copy) and {free / 2**20:.0f} MiB of {device.type} "
            f"memory is free (less {RESERVE_BYTES >> 20} MiB kept in reserve); allowed: a smaller rank, or delete "
            "an adapter first")
