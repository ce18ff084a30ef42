"""The ``pytorch`` engine: samples from the Trainer's own model, no second copy of the weights.

Publishing a version costs nothing here (the trainer's parameters are the sampler's), and a
sample always runs on the adapter's newest weights, which is the version it reports.
"""

from __future__ import annotations

from collections import defaultdict

from colo.types import SampleResult, SamplingParams
from engines.base import AdapterUpdate, Capabilities, InferenceEngine, SampleRequest
from engines.compiled_decode import CompiledDecode
from engines.generation import Row, generate, request_seed, to_sequence

# compiled decoding pads a batch to one of these row counts and its KV cache to a power of two
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
MIN_CACHE = 64


class PyTorchEngine(InferenceEngine):
    name = "pytorch"
    capabilities = Capabilities(
        in_memory_adapter_loading=True,
        runtime_adapter_loading=True,
        sleep=False,
        shares_trainer_weights=True,
        multi_adapter_batch=True,
        unembed_lora=True,
    )
    # one decode loop's KV cache is preallocated for its worst case: these bound it (2**17 positions are
    # 3.7 GiB of bf16 cache on a 1.5B Qwen2.5 shape, 2.9 GiB on the default model)
    max_batch_rows = 64
    max_batch_tokens = 1 << 17

    def __init__(self, context) -> None:
        super().__init__(context)
        self.policy = context.policy
        self.versions: dict[str, int] = {}
        setting = context.settings.pytorch_compile
        self.compiled = setting == "on" or (setting == "auto" and self.policy.device.type == "cuda")
        self._decode: CompiledDecode | None = None

    def publish(self, update: AdapterUpdate) -> None:
        self.versions[update.key.adapter] = update.key.version

    def release(self, adapter: str) -> None:
        self.versions.pop(adapter, None)

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult]:
        policy = self.policy
        # one row per sample, a request's rows side by side and the rows of one adapter together, so the
        # requests of every adapter (and the base model) share each decode loop
        order = sorted(range(len(requests)), key=lambda i: _adapter_of(requests[i]) or "")
        rows: list[Row] = []
        row_adapters: list[str | None] = []
        groups: dict[int, list[int]] = {}
        for i in order:
            req = requests[i]
            seed = request_seed(req.params)
            max_new = min(req.params.max_tokens, self.context.max_model_len - len(req.prompt))
            groups[i] = list(range(len(rows), len(rows) + req.num_samples))
            rows += [Row(req.prompt, req.params, seed, n, max_new) for n in range(req.num_samples)]
            row_adapters += [_adapter_of(req)] * req.num_samples
        slots = self.context.settings.max_loras if self.compiled else None
        for start, end in _batches(rows, row_adapters, self.max_batch_rows, self.max_batch_tokens, slots):
            self._decode_batch(rows[start:end], row_adapters[start:end])

        prompt_logprobs = self._prompt_logprobs(requests)
        results = []
        for i, req in enumerate(requests):
            adapter = _adapter_of(req)
            version = self.versions.get(adapter) if adapter else None
            results.append(SampleResult([to_sequence(rows[j]) for j in groups[i]], adapter, version,
                                        prompt_logprobs.get(i, [None]) if req.prompt_logprobs else None))
        return results

    def _decode_batch(self, rows: list[Row], row_adapters: list[str | None]) -> None:
        policy = self.policy
        if not self.compiled:
            with policy.sampling(row_adapters) as model:
                generate(model, rows, policy.pad_token_id, policy.eos_token_ids, policy.tokenizer, policy.device,
                         policy.vocab_size)
            return
        # compiled decoding: shapes from a few buckets, so each compiled graph serves many batches
        padding = [Row([policy.pad_token_id], SamplingParams(temperature=0), 0, 0, 0)
                   for _ in range(_bucket(len(rows), ROW_BUCKETS) - len(rows))]
        width = max(len(r.prompt) for r in rows) + max(r.max_new for r in rows)
        fixed = (self.context.settings.max_loras, self.context.settings.max_lora_rank, self.max_batch_rows)
        with policy.sampling(row_adapters + [None] * len(padding), fixed) as model:
            if self._decode is None or self._decode.eager is not model:
                self._decode = CompiledDecode(model, policy.device)
            generate(model, rows + padding, policy.pad_token_id, policy.eos_token_ids, policy.tokenizer,
                     policy.device, policy.vocab_size, decode=self._decode,
                     cache_len=max(MIN_CACHE, 1 << (width - 1).bit_length()))

    def _prompt_logprobs(self, requests: list[SampleRequest]) -> dict[int, list[float | None]]:
        """The trainer's own scoring of the prompts that asked for it, one adapter at a time."""
        by_adapter: dict[str | None, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            if req.prompt_logprobs and len(req.prompt) > 1:
                by_adapter[_adapter_of(req)].append(i)
        out: dict[int, list[float | None]] = {}
        for adapter, scored in by_adapter.items():
            with self.policy.active(adapter) as model:
                lps = self.policy.score(model, [requests[i].prompt[:-1] for i in scored],
                                        [requests[i].prompt[1:] for i in scored])
            out.update({i: [None, *lp.tolist()] for i, lp in zip(scored, lps)})
        return out


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
