"""Where the time and memory of a colo step go: resident memory after each phase, the LoRA cost of
vLLM sampling (the same 32 prompts through the base model and through an adapter), and one
forward_backward of a GRPO-sized batch. Prints only; BENCHMARKS.md's analysis quotes it.

    .venv/bin/python benchmarks/profile_step.py
"""

import resource
import time

import psutil

from colo import Datum, SamplingParams, Trainer
from colo.types import SampleJob

process = psutil.Process()


def rss() -> float:
    return round(process.memory_info().rss / 2**30, 2)


def main() -> None:
    print("start: RSS", rss(), "GiB")
    t = Trainer(engine="vllm", max_lora_rank=16, max_loras=4)
    print("after Trainer (model + vLLM + 1 GiB KV cache): RSS", rss(), "GiB")
    a = t.create_lora(rank=16, seed=0)
    tok = t.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {i + 3}?"}],
                                       add_generation_prompt=True, return_dict=False) for i in range(32)]

    def run(adapter):
        jobs = [SampleJob(adapter, q, 1, SamplingParams(max_tokens=64, seed=i)) for i, q in enumerate(prompts)]
        started = time.perf_counter()
        results = t.sample_batch(jobs)
        return sum(len(r.sequences[0].tokens) for r in results) / (time.perf_counter() - started)

    run(None), run(a)  # warm-up
    for name, adapter in (("base model", None), ("LoRA adapter", a)) * 2:
        print(f"vLLM, 32 prompts, {name}: {run(adapter):.0f} tok/s")
    print("after sampling: RSS", rss(), "GiB")
    results = t.sample(a, prompts[:8], 4, SamplingParams(max_tokens=32, seed=0))
    data = [Datum.from_sequence(q + s.tokens) for q, r in zip(prompts, results) for s in r.sequences]
    tokens = sum(len(d.model_input) for d in data)
    started = time.perf_counter()
    t.forward_backward(a, data)
    print(f"forward_backward of {len(data)} sequences, {tokens} tokens: {time.perf_counter() - started:.1f} s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
          f"float32 logits of the batch alone: {tokens * t.policy.vocab_size * 4 / 2**30:.2f} GiB")
    t.close()


if __name__ == "__main__":
    main()
