"""engines.pytorch.decode_attention: the CPU decode path gives what transformers' sdpa gives."""

import types

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engines.pytorch import decode_attention


def _inputs(query_length: int):
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 6, 2, 11, 16
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(batch, heads, query_length, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    mask = torch.ones(batch, 1, query_length, length, dtype=torch.bool)
    mask[0, :, :, :4] = False  # a left-padded row
    mask[1, :, :, 9:] = False  # cache positions not written yet
    return module, query, key, value, mask


def test_decode_step_equals_sdpa_with_grouped_heads_and_padding():
    module, query, key, value, mask = _inputs(1)
    ours, _ = decode_attention.attention(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (3, 1, 6, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_longer_queries_are_left_to_sdpa():
    module, query, key, value, mask = _inputs(4)
    ours, _ = decode_attention.attention(module, query, key, value, mask)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask)
    assert torch.equal(ours, theirs)


def test_the_trainer_model_uses_it_on_cpu(trainer):
    with trainer.policy.without_adapters() as causal_lm:
        assert causal_lm.config._attn_implementation.startswith(decode_attention.PREFIX)
