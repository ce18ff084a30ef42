"""The ``pytorch`` engine: samples from the Trainer's own model, no second copy of the weights.

Publishing a version costs nothing here (the trainer's parameters are the sampler's), and a sample
always runs on the adapter's newest weights, the version the Trainer stamps on it. Prompt logprobs
are the Trainer's own scoring (``prompt_logprobs=False``): the same model would compute them here.
"""

from __future__ import annotations

from dataclasses import dataclass

from colo.types import SamplingParams
from engines.base import (AdapterUpdate, Capabilities, EngineContext, EngineSettings, InferenceEngine, SampleRequest,
                          Samples)
from engines.pytorch import decode_attention
from engines.pytorch.compiled_decode import CompiledDecode
from engines.pytorch.generation import Row, generate, request_seed, to_sequence
from engines.pytorch.mixed_lora import MixedLora
from engines.pytorch.training_model import TrainingModel

# compiled decoding pads a batch to one of these row counts and its KV cache to a power of two
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
MIN_CACHE = 64


@dataclass(frozen=True)
class PyTorchSettings(EngineSettings):
    pytorch_compile: str = "auto"  # auto (CUDA only), on, off


class PyTorchEngine(InferenceEngine):
    name = "pytorch"
    capabilities = Capabilities(
        in_memory_adapter_loading=True,
        runtime_adapter_loading=True,
        sleep=False,
        shares_trainer_weights=True,
        multi_adapter_batch=True,
        unembed_lora=True,
        per_rank=True,
    )
    settings_class = PyTorchSettings
    # one decode loop's KV cache is preallocated for its worst case: these bound it (2**17 positions are
    # 3.7 GiB of bf16 cache on a 1.5B Qwen2.5 shape, 2.9 GiB on the default model)
    max_batch_rows = 64
    max_batch_tokens = 1 << 17
    # rows of one prompt and adapter (a request's samples) share its prefill (off: every row is prefilled)
    share_prefill = True

    def __init__(self, context: EngineContext, model: TrainingModel) -> None:
        super().__init__(context)
        self.model = model
        setting = context.settings.pytorch_compile
        self.compiled = setting == "on" or (setting == "auto" and context.device.type == "cuda")
        self._decode: CompiledDecode | None = None
        self._mixed = MixedLora(context.dtype)
        # prompt tokens the last ``sample`` call prefilled, and those of all its rows (without sharing)
        self.last_prefill_tokens = (0, 0)
        with model.without_adapters() as causal_lm:
            decode_attention.install(causal_lm)

    def publish(self, update: AdapterUpdate) -> None:
        """Nothing to do: the trainer's parameters are what this engine samples from."""

    def release(self, adapter: str) -> None:
        """Nothing to do: a deleted adapter's LoRA layers are gone from the trainer's model."""

    def shutdown(self) -> None:
        self._mixed.close()
        self._decode = None

    def sample(self, requests: list[SampleRequest]) -> list[Samples]:
        # one row per sample, a request's rows side by side and the rows of one adapter together, so the
        # requests of every adapter (and the base model) share each decode loop
        order = sorted(range(len(requests)), key=lambda i: _adapter_of(requests[i]) or "")
        rows: list[Row] = []
        groups: dict[int, list[int]] = {}
        for i in order:
            req = requests[i]
            seed = request_seed(req.params)
            max_new = min(req.params.max_tokens, self.context.max_model_len - len(req.prompt))
            groups[i] = list(range(len(rows), len(rows) + req.num_samples))
            rows += [Row(req.prompt, req.params, seed, n, max_new, _adapter_of(req)) for n in range(req.num_samples)]
        row_adapters = [r.adapter for r in rows]
        slots = self.context.settings.max_loras if self.compiled else None
        prefilled = unshared = 0
        for start, end in _batches(rows, row_adapters, self.max_batch_rows, self.max_batch_tokens, slots):
            done, whole = self._decode_batch(rows[start:end], row_adapters[start:end])
            prefilled, unshared = prefilled + done, unshared + whole
        self.last_prefill_tokens = (prefilled, unshared)
        return [Samples([to_sequence(rows[j]) for j in groups[i]]) for i in range(len(requests))]

    def _decode_batch(self, rows: list[Row], row_adapters: list[str | None]) -> tuple[int, int]:
        """Decode one batch; returns the prompt tokens prefilled and those of its rows (``generate``)."""
        model, context = self.model, self.context
        if not self.compiled:
            with model.without_adapters() as causal_lm, self._mixed.batch(causal_lm, row_adapters):
                return generate(causal_lm, rows, model.pad_token_id, model.eos_token_ids, context.tokenizer,
                                context.device, model.vocab_size, share_prefill=self.share_prefill,
                                select_rows=self._mixed.rows)
        # compiled decoding: shapes from a few buckets, so each compiled graph serves many batches
        padding = [Row([model.pad_token_id], SamplingParams(temperature=0), 0, 0, 0)
                   for _ in range(_bucket(len(rows), ROW_BUCKETS) - len(rows))]
        width = max(len(r.prompt) for r in rows) + max(r.max_new for r in rows)
        fixed = (context.settings.max_loras, context.settings.max_lora_rank, self.max_batch_rows)
        with model.without_adapters() as causal_lm, self._mixed.batch(causal_lm, row_adapters + [None] * len(padding),
                                                                       fixed):
            if self._decode is None or self._decode.eager is not causal_lm:
                self._decode = CompiledDecode(causal_lm, context.device)
            # the padding rows' one-token prompts count too (prefilled once, shared by them all)
            return generate(causal_lm, rows + padding, model.pad_token_id, model.eos_token_ids, context.tokenizer,
                            context.device, model.vocab_size, decode=self._decode,
                            cache_len=max(MIN_CACHE, 1 << (width - 1).bit_length()),
                            share_prefill=self.share_prefill, select_rows=self._mixed.rows)


def _adapter_of(request: SampleRequest) -> str | None:
    return request.adapter.adapter if request.adapter else None


def _batches(rows: list[Row], row_adapters: list[str | None], max_rows: int, max_tokens: int,
             max_adapters: int | None):
    """(start, end) ranges of ``rows`` for the decode batches: at most ``max_rows`` rows, a KV cache of at most
    ``max_tokens`` positions (rows x the longest prompt + new tokens), and at most ``max_adapters`` adapters
    when that is given. A request's rows may land in different batches: each row's draws depend on its
    seed and sample number only."""
    start, longest, adapters = 0, 0, set()
    for end, (row, adapter) in enumerate(zip(rows, row_adapters)):
        length = len(row.prompt) + row.max_new
        grown = adapters | ({adapter} - {None})
        size = end - start
        if size and (size + 1 > max_rows or (size + 1) * max(longest, length) > max_tokens
                     or (max_adapters is not None and len(grown) > max_adapters)):
            yield start, end
            start, longest, grown = end, 0, {adapter} - {None}
        longest = max(longest, length)
        adapters = grown
    if rows:
        yield start, len(rows)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)
