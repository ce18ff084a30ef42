"""Several LoRA adapters in one batch, each row with its own (or none), computed in the base model's dtype.

PEFT's own mixed batches (``adapter_names``) loop over the adapters in every layer, index the batch
with Python lists, and compute in float32 on a bf16 base. Here each LoRA layer stacks the adapters'
matrices once per batch: A of every adapter one under the other (R x in, R the sum of their ranks),
B side by side with the scaling folded in (out x R). A row's hidden state goes through all of A, a 0/1
mask keeps the block of the row's own adapter, and B maps back: three operations per layer whatever
the number of adapters, and the other adapters' blocks contribute exact zeros.

The stacks are copies made when the batch starts, so they are the adapters' weights at that moment;
an optimizer step cannot run during a decode loop (the Trainer does one thing at a time).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer


class _Stack:
    def __init__(self, layer: LoraLayer, present: list[str], row_adapters: list[str | None],
                 dtype: torch.dtype, masks: dict[tuple[str, ...], torch.Tensor | None]) -> None:
        self.a = torch.cat([layer.lora_A[n].weight for n in present]).to(dtype)
        self.b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in present], dim=1).to(dtype)
        key = tuple(present)
        if key not in masks:
            masks[key] = _row_mask(layer, present, row_adapters, dtype, self.a.device)
        self.mask = masks[key]

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        hidden = torch.nn.functional.linear(x.to(self.a.dtype), self.a)
        if self.mask is not None:
            hidden = hidden * self.mask
        return output + torch.nn.functional.linear(hidden, self.b).to(output.dtype)


def _row_mask(layer: LoraLayer, present: list[str], row_adapters: list[str | None], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor | None:
    """(rows, 1, R): ones over each row's own adapter's block; None when every row has the one adapter."""
    if len(present) == 1 and all(a == present[0] for a in row_adapters):
        return None
    ranks = [layer.lora_A[n].weight.shape[0] for n in present]
    starts = dict(zip(present, [sum(ranks[:i]) for i in range(len(ranks))]))
    mask = torch.zeros((len(row_adapters), 1, sum(ranks)), dtype=dtype)
    for row, adapter in enumerate(row_adapters):
        if adapter in starts:
            r = ranks[present.index(adapter)]
            mask[row, 0, starts[adapter]: starts[adapter] + r] = 1
    return mask.to(device)


@contextmanager
def mixed_lora(model: torch.nn.Module, row_adapters: list[str | None], dtype: torch.dtype) -> Iterator[None]:
    """While inside, ``model``'s LoRA layers (PEFT, adapters disabled by the caller) add, to row b of a
    batch, the LoRA of adapter ``row_adapters[b]`` (None: nothing, the base model)."""
    names = list(dict.fromkeys(a for a in row_adapters if a is not None))
    masks: dict[tuple[str, ...], torch.Tensor | None] = {}
    handles = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                present = [n for n in names if n in module.lora_A]
                if present:
                    handles.append(module.register_forward_hook(_Stack(module, present, row_adapters, dtype, masks)))
        yield
    finally:
        for handle in handles:
            handle.remove()
