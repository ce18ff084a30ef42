"""The ``pytorch`` engine: samples from the Trainer's own model, no second copy of the weights.

Publishing a version costs nothing here (the trainer's parameters are the sampler's), and a
sample always runs on the adapter's newest weights, which is the version it reports.
"""

from __future__ import annotations

from collections import defaultdict

from colo.types import SampleResult
from engines.base import AdapterUpdate, Capabilities, InferenceEngine, SampleRequest
from engines.generation import Row, generate, request_generator, to_sequence


class PyTorchEngine(InferenceEngine):
    name = "pytorch"
    capabilities = Capabilities(
        in_memory_adapter_loading=True,
        runtime_adapter_loading=True,
        sleep=False,
        shares_trainer_weights=True,
        multi_adapter_batch=False,
        unembed_lora=True,
    )
    max_batch_rows = 64  # bounds the KV cache and logits of one decode loop

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
        by_adapter: dict[str | None, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_adapter[req.adapter.adapter if req.adapter else None].append(i)

        results: list[SampleResult | None] = [None] * len(requests)
        prompt_logprobs: dict[int, list[float | None]] = {}
        for adapter, indices in by_adapter.items():
            rows: list[Row] = []
            groups: list[list[int]] = []
            for i in indices:
                req = requests[i]
                generator = request_generator(req.params, policy.device)
                max_new = min(req.params.max_tokens, self.context.max_model_len - len(req.prompt))
                groups.append(list(range(len(rows), len(rows) + req.num_samples)))
                rows += [Row(req.prompt, req.params, generator, max_new) for _ in range(req.num_samples)]
            with policy.active(adapter) as model:
                for start, chunk_groups in _chunks(groups, self.max_batch_rows):
                    chunk = rows[start: start + sum(len(g) for g in chunk_groups)]
                    local = [[j - start for j in g] for g in chunk_groups]
                    generate(model, chunk, local, policy.pad_token_id, policy.eos_token_ids,
                             policy.tokenizer, policy.device)
                scored = [i for i in indices if requests[i].prompt_logprobs and len(requests[i].prompt) > 1]
                if scored:
                    lps = policy.score(model, [requests[i].prompt[:-1] for i in scored],
                                       [requests[i].prompt[1:] for i in scored])
                    prompt_logprobs = {i: [None, *lp.tolist()] for i, lp in zip(scored, lps)}
            version = self.versions.get(adapter) if adapter else None
            for i, group in zip(indices, groups):
                wanted = requests[i].prompt_logprobs
                results[i] = SampleResult([to_sequence(rows[j]) for j in group], adapter, version,
                                          prompt_logprobs.get(i, [None]) if wanted else None)
        return results  # type: ignore[return-value]


def _chunks(groups: list[list[int]], limit: int):
    """Split request groups into batches of at most ``limit`` rows (a request is never split)."""
    start, current, size = 0, [], 0
    for g in groups:
        if current and size + len(g) > limit:
            yield start, current
            start, current, size = start + size, [], 0
        current.append(g)
        size += len(g)
    if current:
        yield start, current
