"""The ``pytorch`` engine: samples from the Trainer's own model, no second copy of the weights.

Publishing a version costs nothing here (the trainer's parameters are the sampler's), and a
sample always runs on the adapter's newest weights, which is the version it reports.
"""

from __future__ import annotations

from collections import defaultdict

from colo.types import SampleResult
from engines.base import AdapterUpdate, Capabilities, InferenceEngine, SampleRequest
from engines.generation import Row, generate, request_seed, to_sequence


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
        lengths = [len(requests[i].prompt) + rows[groups[i][0]].max_new for i in order]
        for start, members in _chunks([groups[i] for i in order], lengths, self.max_batch_rows, self.max_batch_tokens):
            end = start + sum(len(g) for g in members)
            with policy.sampling(row_adapters[start:end]) as model:
                generate(model, rows[start:end], policy.pad_token_id, policy.eos_token_ids, policy.tokenizer,
                         policy.device, policy.vocab_size)

        prompt_logprobs = self._prompt_logprobs(requests)
        results = []
        for i, req in enumerate(requests):
            adapter = _adapter_of(req)
            version = self.versions.get(adapter) if adapter else None
            results.append(SampleResult([to_sequence(rows[j]) for j in groups[i]], adapter, version,
                                        prompt_logprobs.get(i, [None]) if req.prompt_logprobs else None))
        return results

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


def _chunks(groups: list[list[int]], lengths: list[int], max_rows: int, max_tokens: int):
    """Split request groups into decode batches (a request is never split) of at most ``max_rows`` rows and
    a KV cache of at most ``max_tokens`` positions: rows x the longest prompt + new tokens of the batch.
    ``lengths`` is each group's prompt + new tokens."""
    start, current, size, longest = 0, [], 0, 0
    for g, length in zip(groups, lengths):
        if current and (size + len(g) > max_rows or (size + len(g)) * max(longest, length) > max_tokens):
            yield start, current
            start, current, size, longest = start + size, [], 0, 0
        current.append(g)
        size += len(g)
        longest = max(longest, length)
    if current:
        yield start, current
