"""Several LoRA adapters in one batch, each row with its own (or none), computed in the base model's dtype.

PEFT's own mixed batches (``adapter_names``) loop over the adapters in every layer, index the batch
with Python lists, and compute in float32 on a bf16 base. Here each LoRA layer stacks the batch's
adapters once per batch: A of every adapter one under the other (W x in, W the stack's width), B side
by side with the scaling folded in (out x W). Every adapter has the same columns in every layer (a
layer it does not train holds zeros there), so one 0/1 row mask (rows x 1 x W), shared by all layers,
keeps the block of each row's own adapter: three operations per layer whatever the number of
adapters, and the other adapters' blocks contribute exact zeros.

Two layouts:
- sized to the batch (eager decoding): one block per adapter of the batch, as wide as its rank;
- fixed (compiled decoding): ``slots`` blocks of ``rank`` columns in buffers allocated once and
  rewritten in place, so a compiled (CUDA-graph) decode step sees the same shapes and addresses from
  one batch to the next.

The stacks are copies made when the batch starts, so they are the adapters' weights at that moment;
an optimizer step cannot run during a decode loop (the Trainer does one thing at a time).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer


class _Shared:
    """What every layer's hook reads: whether sampling is on, and the row mask."""

    def __init__(self) -> None:
        self.active = False
        self.mask: torch.Tensor | None = None  # (rows, 1, W); None: every row has the one adapter


class _LayerStack:
    """The forward hook of one LoRA layer (PEFT's own LoRA is disabled while it is active)."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.a: torch.Tensor | None = None  # (W, in)
        self.b: torch.Tensor | None = None  # (out, W)

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.shared.active or self.a is None:
            return output
        x = args[0]
        hidden = torch.nn.functional.linear(x.to(self.a.dtype), self.a)
        if self.shared.mask is not None:
            hidden = hidden * self.shared.mask[: x.shape[0]]
        return output + torch.nn.functional.linear(hidden, self.b).to(output.dtype)


class MixedLora:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.shared = _Shared()
        self._hooked: dict[int, tuple[LoraLayer, _LayerStack]] = {}
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}

    @contextmanager
    def batch(self, model: torch.nn.Module, row_adapters: list[str | None],
              fixed: tuple[int, int, int] | None = None) -> Iterator[None]:
        """While inside, row b of a batch through ``model`` (PEFT, its own LoRA disabled by the caller) gets
        adapter ``row_adapters[b]`` (None: the base model). ``fixed`` = (slots, rank, rows) asks for the
        fixed layout: at most ``slots`` adapters of rank at most ``rank`` and at most ``rows`` rows."""
        names = list(dict.fromkeys(a for a in row_adapters if a is not None))
        layers = self._layers(model)
        with torch.no_grad():
            if fixed is None:
                self._fill_sized(layers, names, row_adapters)
            else:
                self._fill_fixed(layers, names, row_adapters, *fixed)
        self.shared.active = True
        try:
            yield
        finally:
            self.shared.active = False

    @contextmanager
    def rows(self, index: list[int]) -> Iterator[None]:
        """While inside, a forward pass of ``len(index)`` rows is rows ``index`` of the batch: row k gets the
        adapter of row ``index[k]`` (a prefill of the batch's distinct prompts only)."""
        mask = self.shared.mask
        if mask is not None:
            self.shared.mask = mask[index]
        try:
            yield
        finally:
            self.shared.mask = mask

    def _layers(self, model: torch.nn.Module) -> list[tuple[LoraLayer, _LayerStack]]:
        """Every LoRA layer of ``model`` with its hook (installed once per layer object, kept while it lives)."""
        live = {}
        for module in model.modules():
            if isinstance(module, LoraLayer):
                key = id(module)
                if key not in self._hooked or self._hooked[key][0] is not module:
                    stack = _LayerStack(self.shared)
                    self._handles[key] = module.register_forward_hook(stack)
                    self._hooked[key] = (module, stack)
                live[key] = self._hooked[key]
        self._hooked = live  # layers PEFT removed (their adapters unloaded) are forgotten
        self._handles = {k: h for k, h in self._handles.items() if k in live}
        return list(live.values())

    def close(self) -> None:
        """Take the hooks off the model's LoRA layers (the engine is shut down; the model lives on)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._hooked.clear()

    def _fill_sized(self, layers, names: list[str], row_adapters: list[str | None]) -> None:
        ranks = _ranks(layers, names)
        starts = _starts([ranks[n] for n in names])
        width = sum(ranks.values())
        for layer, stack in layers:
            if not any(n in layer.lora_A for n in names):
                stack.a = stack.b = None
                continue
            stack.a = torch.zeros((width, layer.in_features), dtype=self.dtype, device=_device(layer))
            stack.b = torch.zeros((layer.out_features, width), dtype=self.dtype, device=_device(layer))
            for n, start in zip(names, starts):
                _copy_block(layer, n, stack.a, stack.b, start)
        if len(names) == 1 and all(a == names[0] for a in row_adapters):
            self.shared.mask = None
        else:
            self.shared.mask = _mask(len(row_adapters), width, row_adapters, dict(zip(names, starts)), ranks,
                                     self.dtype, _device(layers[0][0]) if layers else torch.device("cpu"))

    def _fill_fixed(self, layers, names: list[str], row_adapters: list[str | None], slots: int, rank: int,
                    rows: int) -> None:
        ranks = _ranks(layers, names)
        if len(names) > slots or any(r > rank for r in ranks.values()) or len(row_adapters) > rows:
            raise ValueError(f"{len(names)} adapters of ranks {sorted(ranks.values())} in {len(row_adapters)} rows do "
                             f"not fit the fixed layout of {slots} slots of rank {rank} and {rows} rows")
        width = slots * rank
        starts = [k * rank for k in range(len(names))]
        for layer, stack in layers:
            device = _device(layer)
            if stack.a is None or stack.a.shape[0] != width:
                stack.a = torch.zeros((width, layer.in_features), dtype=self.dtype, device=device)
                stack.b = torch.zeros((layer.out_features, width), dtype=self.dtype, device=device)
                _static(stack.a, stack.b)
            stack.a.zero_()
            stack.b.zero_()
            for n, start in zip(names, starts):
                _copy_block(layer, n, stack.a, stack.b, start)
        device = _device(layers[0][0]) if layers else torch.device("cpu")
        mask = self.shared.mask
        if mask is None or mask.shape != (rows, 1, width):
            mask = torch.zeros((rows, 1, width), dtype=self.dtype, device=device)
            _static(mask)
        mask.copy_(_mask(rows, width, row_adapters, dict(zip(names, starts)), ranks, self.dtype, device))
        self.shared.mask = mask


def _ranks(layers, names: list[str]) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for layer, _ in layers:
        for n in names:
            if n in layer.lora_A:
                ranks[n] = layer.lora_A[n].weight.shape[0]
    return {n: ranks.get(n, 0) for n in names}


def _starts(widths: list[int]) -> list[int]:
    return [sum(widths[:i]) for i in range(len(widths))]


def _device(layer: LoraLayer) -> torch.device:
    return layer.get_base_layer().weight.device


def _copy_block(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor, start: int) -> None:
    if name not in layer.lora_A:
        return  # an adapter that does not train this layer: its block stays zero
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    r = lora_a.shape[0]
    a[start: start + r].copy_(lora_a)
    b[:, start: start + r].copy_(lora_b * layer.scaling[name])


def _mask(rows: int, width: int, row_adapters: list[str | None], starts: dict[str, int], ranks: dict[str, int],
          dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, 1, width): ones over each row's own adapter's block (rows past ``row_adapters`` stay zero)."""
    mask = torch.zeros((rows, 1, width), dtype=dtype)
    for row, adapter in enumerate(row_adapters):
        if adapter is not None:
            mask[row, 0, starts[adapter]: starts[adapter] + ranks[adapter]] = 1
    return mask.to(device)


def _static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile these buffers keep their address (CUDA graphs then read them in place)."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
