"""Attention over a packed row of segments (``colo.packing``), registered as a transformers attention function.

Called with ``colo_packing=PackedAttention(...)`` (the model passes keyword arguments down to its attention
functions, and gradient checkpointing keeps them for the recomputation), it computes, for each group of
sibling segments, one ``scaled_dot_product_attention`` of their queries against their ancestors' keys and
values followed by their own, under a mask that is causal by position within the sequence (and within the
layer's sliding window, where it has one). The ancestors' keys and values are gathered once per group and
broadcast to its members, so under autograd a shared prefix receives the sum of its members' gradients.
Without ``colo_packing`` it is exactly the implementation the model had before (``sdpa`` as loaded), so the
same model keeps serving prompts, decode steps and every other caller unchanged.

On CUDA, SDPA with a boolean mask runs PyTorch's memory-efficient kernel; FlashAttention's variable-length
kernel would avoid the padding of sibling queries (bounded here by ``colo.packing.PAD_SLACK``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from colo.errors import ConfigError
from colo.packing import PackedAttention

PREFIX = "colo_packed_"
# attention variants (gpt-oss sinks, T5-style biases) the masked softmax below does not implement
_UNSUPPORTED = ("s_aux", "sinks", "position_bias")


def install(model: torch.nn.Module) -> None:
    """Make ``model`` accept ``colo_packing``: its attention implementation wrapped, masks as before."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrap(ALL_ATTENTION_FUNCTIONS[current]))
        if current in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)


def _wrap(inner):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  softcap=None, colo_packing: PackedAttention | None = None, **kwargs):
        if colo_packing is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         sliding_window=sliding_window, softcap=softcap, **kwargs)
        unsupported = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if unsupported:
            raise ConfigError(f"{type(module).__name__} uses attention {unsupported}, which colo's packed training "
                              "attention does not implement; allowed: models with plain softmax attention "
                              "(optionally soft-capped, sliding-window)")
        return packed(query, key, value, colo_packing, scaling, sliding_window, softcap), None
    return attention


def packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PackedAttention,
           scaling: float | None, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """query (1, heads, T, dim), key/value (1, kv_heads, T, dim) -> (1, T, heads, dim)."""
    q, k, v = query[0], key[0], value[0]
    heads, dim = q.shape[0], q.shape[2]
    kv_heads = k.shape[0]
    outputs = []
    for chunk in plan.chunks:
        n, width = chunk.valid.shape
        if chunk.rows is None:  # segments of one length: a slice of the row, no copy
            end = chunk.start + n * width
            qq = q[:, chunk.start:end].unflatten(1, (n, width)).transpose(0, 1)
            k_own = k[:, chunk.start:end].unflatten(1, (n, width)).transpose(0, 1)
            v_own = v[:, chunk.start:end].unflatten(1, (n, width)).transpose(0, 1)
        else:
            flat = chunk.rows.reshape(-1)
            qq = q[:, flat].unflatten(1, (n, width)).transpose(0, 1)
            k_own = k[:, flat].unflatten(1, (n, width)).transpose(0, 1)
            v_own = v[:, flat].unflatten(1, (n, width)).transpose(0, 1)
        kk = torch.cat([k[:, chunk.context].unsqueeze(0).expand(n, -1, -1, -1), k_own], dim=2)
        vv = torch.cat([v[:, chunk.context].unsqueeze(0).expand(n, -1, -1, -1), v_own], dim=2)
        mask = chunk.mask(sliding_window)
        if softcap:
            out = _softcapped(qq, kk, vv, mask, scaling if scaling is not None else dim ** -0.5, softcap)
        else:
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scaling,
                                                 enable_gqa=heads != kv_heads)
        out = out.transpose(1, 2)  # (n, width, heads, dim)
        outputs.append(out.reshape(n * width, heads, dim) if chunk.rows is None else out[chunk.valid])
    return torch.cat(outputs).unsqueeze(0)


def _softcapped(q, k, v, mask, scale, softcap):
    """softmax(softcap * tanh(q k^T / softcap)) v written out (SDPA has no soft-capping); scores in float32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
