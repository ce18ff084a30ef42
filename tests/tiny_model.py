"""Tiny random models with a byte-level BPE tokenizer, built offline in a few seconds: a Llama, and one
model of each family colo is verified on.

head_dim is 64 (hidden 128, 2 heads): vLLM's CPU attention kernel rejects smaller heads.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the cat dog sat on a mat and ran to big small red blue green one two three four five six seven "
         "eight nine ten what is plus minus answer yes no hello world apple tree river stone").split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words) + f" {rng.randint(0, 199)} + {rng.randint(0, 99)} = {rng.randint(0, 300)}.")
    return lines


def build_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, vocab_size: int = 512, max_positions: int = 256) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = build_tokenizer(out, vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


# the families colo is verified on, each from its own configuration class at a tiny size (head_dim 64, as
# vLLM's CPU attention needs); sliding windows of 16 tokens, so that test sequences run past them
SLIDING_WINDOW = 16
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),  # Llama 3.2 1B/3B tie their output layer
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 64}),
    "qwen3-moe": ("Qwen3MoeConfig", {"tie_word_embeddings": False, "head_dim": 64, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": SLIDING_WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "mistral": ("MistralConfig", {"head_dim": 64, "sliding_window": SLIDING_WINDOW}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),
}


def build_tiny_family(out: Path, family: str, vocab_size: int = 512, max_positions: int = 256) -> Path:
    """A tiny random model of ``family`` (a key of FAMILIES), with the byte-level tokenizer above."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra = FAMILIES[family]
    fast = build_tokenizer(out, vocab_size)
    config = getattr(transformers, class_name)(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return out
