"""The base model, loaded once, with every LoRA adapter attached to it (PEFT multi-adapter).

Both the Trainer and the ``pytorch`` engine work through this object, so there is one copy of the
base weights. The model stays in eval mode: LoRA dropout is 0 and no layer behaves differently in
training, which keeps the trainer's logprobs and the sampler's logprobs the same computation.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from colo.types import LoraConfig

log = logging.getLogger(__name__)

_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return getattr(torch, dtype)


class PolicyModel:
    def __init__(self, path: str, device: torch.device, dtype: torch.dtype) -> None:
        self.path = path
        self.device = device
        self.dtype = dtype
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        base.requires_grad_(False)
        base.eval()
        self._base = base
        self._peft: peft.PeftModel | None = None  # created with the first adapter
        self.vocab_size: int = base.get_input_embeddings().num_embeddings
        self.max_positions: int = getattr(base.config, "max_position_embeddings", 1 << 30)
        self.num_layers: int = getattr(base.config, "num_hidden_layers", 0)
        self.pad_token_id: int = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_token_ids: frozenset[int] = _eos_ids(base, self.tokenizer)
        self._modules = _linear_modules(base)

    # ---- adapters -------------------------------------------------------------------------------

    def target_modules(self, lora: LoraConfig) -> list[str]:
        names: set[str] = set()
        if lora.train_attn:
            names |= self._modules["attn"]
        if lora.train_mlp:
            names |= self._modules["mlp"]
        if lora.train_unembed:
            names |= self._modules["unembed"]
        return sorted(names)

    def peft_config(self, lora: LoraConfig) -> peft.LoraConfig:
        return peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            target_modules=self.target_modules(lora),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.path,
        )

    def add_adapter(self, name: str, lora: LoraConfig, seed: int) -> None:
        config = self.peft_config(lora)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)  # LoRA A's init is random: the seed makes an adapter reproducible
            if self._peft is None:
                self._peft = peft.get_peft_model(self._base, config, adapter_name=name)
                self._peft.eval()
            else:
                self._peft.add_adapter(name, config)

    def delete_adapter(self, name: str) -> None:
        assert self._peft is not None
        others = [a for a in self._peft.peft_config if a != name]
        if not others:
            # the last adapter: take the LoRA layers out so the base model runs as it was loaded
            self._base = self._peft.unload()
            self._peft = None
            return
        # PeftModel would keep a deleted adapter as its active one: point it at a live one first
        self._peft.set_adapter(others[0], inference_mode=True)
        self._peft.delete_adapter(name)

    def parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The adapter's trainable tensors, keyed as PEFT saves them (adapter name left out)."""
        assert self._peft is not None
        marker = f".{name}."
        return {
            key.replace(marker, "."): p
            for key, p in self._peft.named_parameters()
            if marker in key and ".lora_" in key
        }

    @contextmanager
    def active(self, name: str | None, train: bool = False) -> Iterator[torch.nn.Module]:
        """The model with adapter ``name`` active (``None``: the base model)."""
        if self._peft is None:
            assert name is None
            yield self._base
        elif name is None:
            with self._peft.disable_adapter():
                yield self._peft
        else:
            # set_adapter also gives the active adapter requires_grad and takes it from the others
            self._peft.set_adapter(name, inference_mode=not train)
            yield self._peft

    # ---- scoring --------------------------------------------------------------------------------

    def token_logprobs(self, model: torch.nn.Module, inputs: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        """logprob of ``targets[b][i]`` given ``inputs[b][: i + 1]``, one float32 tensor per sequence.

        Sequences are right-padded into one batch; with a causal mask, padding after a sequence
        cannot change its logprobs.
        """
        length = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), length), self.pad_token_id, dtype=torch.long)
        tgt = torch.zeros((len(inputs), length), dtype=torch.long)
        mask = torch.zeros((len(inputs), length), dtype=torch.long)
        for b, (x, t) in enumerate(zip(inputs, targets)):
            ids[b, : len(x)] = torch.tensor(x)
            tgt[b, : len(t)] = torch.tensor(t)
            mask[b, : len(x)] = 1
        ids, tgt, mask = ids.to(self.device), tgt.to(self.device), mask.to(self.device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        # gather - logsumexp is log_softmax without a second (B, T, V) tensor
        picked = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return [picked[b, : len(x)] for b, x in enumerate(inputs)]


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _linear_modules(model: torch.nn.Module) -> dict[str, set[str]]:
    """Leaf names of the linear layers LoRA can target, sorted into attention, MLP and unembedding."""
    out: dict[str, set[str]] = {"attn": set(), "mlp": set(), "unembed": set()}
    unembed = model.get_output_embeddings()
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = path.rsplit(".", 1)[-1]
        lowered = path.lower()
        if module is unembed:
            out["unembed"].add(leaf)
        elif any(h in lowered for h in _ATTN_HINTS):
            out["attn"].add(leaf)
        elif any(h in lowered for h in _MLP_HINTS):
            out["mlp"].add(leaf)
    return out
