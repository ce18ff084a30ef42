"""Overfit one sequence and sample it back through the colocated vLLM engine; exits non-zero on any
mismatch. Run by tests/test_torchrun.py under ``torchrun --nproc_per_node=1``."""

import sys

from colo import AdamParams, Datum, SamplingParams, Trainer


def main(model_dir: str) -> None:
    with Trainer(model=model_dir, dtype="float32", engine="vllm", max_lora_rank=16) as trainer:
        backend = trainer.engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
        tokens = trainer.tokenizer.encode("the cat sat on a mat and ran to the big red tree")
        adapter = trainer.create_lora(rank=8, seed=0)
        for _ in range(40):
            trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
            trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
        result = trainer.sample(adapter, [tokens[:3]], 1, SamplingParams(max_tokens=len(tokens) - 3, temperature=0))[0]
        seq = result.sequences[0]
        ours = trainer.compute_logprobs(adapter, tokens[:3] + seq.tokens)[3:]
        gap = max(abs(a - b) for a, b in zip(ours, seq.logprobs))
        print(f"backend={backend} version={result.adapter_version} recited={seq.tokens == tokens[3:]} gap={gap:.2e}")
        if seq.tokens != tokens[3:] or result.adapter_version != 40 or gap > 1e-4:
            sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
