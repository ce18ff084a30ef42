"""The frozen base model sharded across the ranks with PyTorch's FSDP2 (``COLO_SHARD_BASE``), for bases larger
than one device holds.

Each decoder layer is its own FSDP unit: a rank keeps 1/N of its weights, and the layer's whole weights are
gathered just before it runs (forward, and again in backward) and freed right after, so a rank holds its
shard plus about one layer at a time. The decoder's own weights (embeddings, final norm) and an untied
output layer are units of their own; tied embeddings stay whole on every rank (FSDP would shard the embeddings' reference and leave the
output layer's reference to the whole matrix behind).

LoRA parameters are not sharded: PEFT adds them after this, as plain tensors on every rank, and the
Trainer sums their gradients across ranks once per ``forward_backward`` as in plain data parallel
training. Adapters are a few MB; replicating them keeps checkpoints, exports and the engines' updates as
they are, and costs no collective per layer (FSDP would reduce-scatter their gradients layer by layer).

Every gathered layer is a collective: all ranks must run the same forward and backward passes. The
Trainer pads a rank's share of micro-batches with empty passes to the longest rank's count
(``Trainer._run_loss``); every other use of the model is the same call on every rank.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

log = logging.getLogger(__name__)


def shard_base(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """Shard ``model`` (a transformers causal LM, frozen, before any adapter is added) over ``world`` ranks."""
    mesh = init_device_mesh(device.type, (world,))
    decoder = model.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    # the decoder is the unit the Trainer calls (it scores from the decoder's hidden states), so it is the
    # root that tells its layers to free their weights after each use; it holds the embeddings and the norm
    fully_shard(decoder, mesh=mesh, reshard_after_forward=True, ignored_params={embeddings.weight} if tied else None)
    if head is not None and not tied:
        fully_shard(head, mesh=mesh, reshard_after_forward=True)
    log.info("colo: base model sharded over %d ranks (FSDP2): %d decoder layers, %s", world, len(decoder.layers),
             "the embeddings whole (tied to the output layer)" if tied else "the embeddings and the output layer")


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of storage this rank holds for the base model's parameters (a sharded one: its local shard; a
    storage shared by tied parameters, once; adapters' LoRA parameters left out)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        storage = (p.to_local() if hasattr(p, "to_local") else p).untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
