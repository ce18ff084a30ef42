"""The base model, loaded once, with every LoRA adapter attached to it (PEFT multi-adapter).

The Trainer trains and scores through this object; the ``pytorch`` engine samples from it through a
narrow protocol (``engines.pytorch.training_model``), so there is one copy of the base weights. The model stays in eval mode: LoRA dropout is 0 and no layer behaves differently in
training, which keeps the trainer's logprobs and the sampler's logprobs the same computation.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import peft
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from colo.errors import ConfigError
from colo import packed_attention, sharding
from colo.packing import pack, plan
from colo.types import LoraConfig

log = logging.getLogger(__name__)

# the architectures tests/test_model_families.py runs through both engines (tiny models of each configuration
# class): anything else loads with a warning, and the start-up scoring check still guards its numbers
VERIFIED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                          "Gemma3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM")
_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")
# float32 logits built at once while scoring: 2**25 values (128 MiB), e.g. 682 rows of a 49k vocabulary
LOGIT_CHUNK_VALUES = 1 << 25


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
    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, microbatch_tokens: int = 4096,
                 gradient_checkpointing: bool = False, share_prefixes: bool = True) -> None:
        self.path = path
        self.device = device
        self.dtype = dtype
        self.microbatch_tokens = microbatch_tokens
        self.gradient_checkpointing = gradient_checkpointing
        self.share_prefixes = share_prefixes
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        base.requires_grad_(False)
        base.eval()
        packed_attention.install(base)
        self._base = base
        self._peft: peft.PeftModel | None = None  # created with the first adapter
        self.vocab_size: int = base.get_input_embeddings().num_embeddings
        self.max_positions: int = getattr(base.config, "max_position_embeddings", 1 << 30)
        self.num_layers: int = getattr(base.config, "num_hidden_layers", 0)
        self.architecture: str = next(iter(getattr(base.config, "architectures", None) or []), "unknown")
        self.pad_token_id: int = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_token_ids: frozenset[int] = _eos_ids(base, self.tokenizer)
        if self.architecture not in VERIFIED_ARCHITECTURES:
            log.warning("colo: %s is not one of the architectures colo is verified on (%s); it loads, and the check "
                        "of its scoring path below refuses it if its logits are not the output layer's",
                        self.architecture, ", ".join(VERIFIED_ARCHITECTURES))
        self._modules = _linear_modules(base)
        # mixture-of-experts MLPs whose experts are fused parameters (transformers 5: Qwen3MoeExperts), not
        # linear layers: PEFT can target them (target_parameters), but neither engine serves such a LoRA yet
        self.fused_experts: bool = any(p.dim() == 3 and any(h in name.lower() for h in _MLP_HINTS)
                                       for name, p in base.named_parameters())
        self.logit_chunk_rows = max(1, LOGIT_CHUNK_VALUES // self.vocab_size)
        self.logit_softcap: float | None = getattr(base.config, "final_logit_softcapping", None)
        self.sharded = False
        self._check_scoring_path()

    def shard(self, world: int) -> None:
        """Shard the frozen base across ``world`` ranks (``colo.sharding``); before any adapter is added."""
        assert self._peft is None, "the base is sharded before adapters are added"
        sharding.shard_base(self._base, self.device, world)
        self.sharded = True

    def base_bytes(self) -> int:
        """Bytes of base-model parameters this rank holds (its shards, when sharded)."""
        return sharding.local_bytes(self._base)

    def empty_pass(self, model: torch.nn.Module, backward: bool) -> None:
        """A one-token forward (and backward) that contributes nothing: under a sharded base, a rank with fewer
        micro-batches than another runs these, so every rank gathers each layer as often as the others."""
        lp = self.token_logprobs(model, [[self.pad_token_id]], [[self.pad_token_id]])[0]
        if backward:
            (lp.sum() * 0.0).backward()

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

    def lora_values(self, lora: LoraConfig) -> int:
        """How many values an adapter of this shape holds: rank x (inputs + outputs) of each target layer."""
        targets = set(self.target_modules(lora))
        return sum(lora.rank * (m.in_features + m.out_features) for path, m in self._base.named_modules()
                   if isinstance(m, torch.nn.Linear) and path.rsplit(".", 1)[-1] in targets)

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

    @contextmanager
    def without_adapters(self) -> Iterator[torch.nn.Module]:
        """The causal LM with PEFT's LoRA switched off; its LoRA layers keep every adapter's weights (the
        pytorch engine applies each row's adapter itself)."""
        if self._peft is None:
            yield self._base
            return
        with self._peft.disable_adapter():
            yield self._peft.get_base_model()

    # ---- scoring --------------------------------------------------------------------------------

    def micro_batches(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of the sequences, grouped into micro-batches of at most ``microbatch_tokens`` computed tokens."""
        return plan(sequences, self.microbatch_tokens, self.share_prefixes)

    def score(self, model: torch.nn.Module, inputs: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        """``token_logprobs`` of any number of sequences without gradients, one micro-batch at a time."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
        with torch.no_grad():
            for group in self.micro_batches(inputs):
                for i, lp in zip(group, self.token_logprobs(model, [inputs[i] for i in group],
                                                            [targets[i] for i in group])):
                    out[i] = lp
        return out

    def token_logprobs(self, model: torch.nn.Module, inputs: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        """logprob of ``targets[b][i]`` given ``inputs[b][: i + 1]``, one float32 tensor per sequence.

        One forward over one micro-batch: the caller keeps it under the token budget (``score`` and
        the Trainer do). The micro-batch is one packed row without padding, each prefix shared by several
        sequences computed once (``colo.packing``, ``share_prefixes``). The logits are never built for the
        whole micro-batch: the packed hidden states go through the output layer a chunk of rows at a time,
        each row's logsumexp is computed once for every sequence through it, and under autograd each chunk's
        logits are recomputed in backward instead of kept.
        """
        packed = pack(inputs, self.device, self.share_prefixes)
        ids = torch.tensor([packed.tokens], dtype=torch.long, device=self.device)
        positions = torch.tensor([packed.positions], dtype=torch.long, device=self.device)
        causal_lm = model.get_base_model() if isinstance(model, peft.PeftModel) else model
        head = causal_lm.get_output_embeddings()
        # a 4-D mask is taken as already built, so transformers builds none: the packed attention masks itself
        no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        with self._checkpointed_layers(causal_lm):
            hidden = causal_lm.get_decoder()(input_ids=ids, position_ids=positions, attention_mask=no_mask,
                                             use_cache=False, colo_packing=packed.attention).last_hidden_state[0]
        # one (row, target) pair per sequence position, taken in row order so each chunk's pairs are contiguous
        rows = torch.tensor([r for path in packed.paths for r in path], dtype=torch.long, device=self.device)
        wanted = torch.tensor([t for ts in targets for t in ts], dtype=torch.long, device=self.device)
        by_row = torch.argsort(rows, stable=True)
        rows, wanted = rows[by_row], wanted[by_row]
        bounds = torch.searchsorted(rows, torch.arange(0, hidden.shape[0] + self.logit_chunk_rows, self.logit_chunk_rows,
                                                       device=self.device)).tolist()
        recompute = torch.is_grad_enabled()
        chunks = []
        for c, start in enumerate(range(0, hidden.shape[0], self.logit_chunk_rows)):
            lo, hi = bounds[c], bounds[c + 1]
            if lo == hi:
                continue
            args = (head, hidden[start: start + self.logit_chunk_rows], rows[lo:hi] - start, wanted[lo:hi])
            chunks.append(checkpoint(self._chunk_logprobs, *args, use_reentrant=False) if recompute
                          else self._chunk_logprobs(*args))
        where = torch.empty_like(by_row)
        where[by_row] = torch.arange(len(by_row), device=self.device)  # each pair's place in row order
        return list(torch.cat(chunks)[where].split([len(x) for x in inputs]))

    def _chunk_logprobs(self, head: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
        """logprob of ``targets[i]`` at row ``rows[i]`` of ``hidden``: a row shared by several sequences has its
        logits and logsumexp computed once, whatever each sequence's target there."""
        logits = head(hidden).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        # gather - logsumexp is log_softmax without a second (rows, vocabulary) tensor
        return logits[rows, targets] - torch.logsumexp(logits, dim=-1)[rows]

    @contextmanager
    def _checkpointed_layers(self, causal_lm: torch.nn.Module) -> Iterator[None]:
        """Gradient checkpointing of the decoder layers while autograd records (``gradient_checkpointing``).

        transformers checkpoints a layer only when that layer is in training mode; the model stays in
        eval mode (see the module docstring), so only the layer objects themselves are flagged, not
        their children: dropout and every other submodule keep behaving as in eval.
        """
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            yield
            return
        layers = [m for m in causal_lm.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            layer.training = True
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = False
                layer.training = False

    def _check_scoring_path(self) -> None:
        """The hidden-states path must give the model's own logits; refuse a model whose head differs."""
        probe = torch.arange(1, min(9, self.vocab_size), device=self.device).unsqueeze(0)
        with torch.no_grad():
            logits = self._base(input_ids=probe, use_cache=False).logits.float()[0, :-1]
            expected = logits.gather(-1, probe[0, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
            got = self.token_logprobs(self._base, [probe[0, :-1].tolist()], [probe[0, 1:].tolist()])[0]
        gap = float((got - expected).abs().max())
        # relative to the logprobs' size: the probe's special tokens score near -25, where float32's rounding
        # over 30 layers (the default model) already reaches 2.5e-4; a head that is not the decoder's output
        # layer misses by whole units
        tolerance = (1e-4 if self.dtype == torch.float32 else 5e-2) * max(1.0, float(expected.abs().max()))
        if not gap <= tolerance:
            raise ConfigError(f"COLO_MODEL={self.path!r}: logprobs from the final hidden states differ from the model's own by "
                             f"{gap:.3g}; colo's chunked scoring supports causal LMs whose logits are the output "
                             "layer applied to the decoder's last hidden state (optionally soft-capped)")


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
