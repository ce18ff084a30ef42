"""Attention for decode steps on CPU: one new token per row, against the KV cache.

PyTorch's CPU SDPA kernel is built for long queries: for one query token per row it measured 1.2 ms a
call (32 rows, 9 query heads sharing 3 KV heads, 104 cached positions, bf16) where two float32
matmuls and a softmax take 0.27 ms, with an error against a float64 reference no larger than the
kernel's; and before the kernel, transformers copies the KV heads once per query head (GQA). Here
the query heads are grouped onto their KV head instead, so nothing is copied. It wraps the model's own
attention implementation when that one takes ``sdpa``'s masks (``sdpa``, or colo's training attention over
it), registered as ``colo_sdpa_<that implementation>``: everywhere but decode steps on the CPU (prompts,
training, other devices) the wrapped implementation runs unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "colo_sdpa_"
# attention variants the plain softmax(q k^T) v below does not implement, and colo's packed training rows
# (colo.packed_attention): left to the wrapped implementation
_OTHER_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "colo_packing")


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              fallback=sdpa_attention_forward, **kwargs) -> tuple[torch.Tensor, None]:
    if (query.shape[2] != 1 or query.device.type != "cpu" or dropout
            or any(kwargs.get(k) is not None for k in _OTHER_KWARGS)):
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()  # query heads grouped by KV head
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # (batch, kv_heads, group, length)
    if attention_mask is not None:
        mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # (batch, kv_heads, group, dim)
    # transformers' layout after attention: (batch, query length, heads, dim)
    return out.reshape(batch, 1, heads, dim).to(query.dtype), None


def install(model: torch.nn.Module) -> None:
    """Decode steps on the CPU through ``attention`` where ``model``'s attention takes ``sdpa``'s masks."""
    current = getattr(model.config, "_attn_implementation", None)
    if current is None or current.startswith(PREFIX) or ALL_MASK_ATTENTION_FUNCTIONS.get(current) is not sdpa_mask:
        return
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, partial(attention, fallback=ALL_ATTENTION_FUNCTIONS[current]))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)
