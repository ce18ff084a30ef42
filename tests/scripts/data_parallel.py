"""SPMD training and sampling, run as ``python`` (one rank) or ``torchrun --nproc_per_node=N`` (N ranks).

    data_parallel.py MODEL_DIR OUT_DIR [--die-after-step K | --hang-after-step K] [--timeout SECONDS] [--engine vllm]
                     [--switch-engine ENGINE]

Every rank makes the same calls; each writes what it ended with to OUT_DIR/rank-R.json and
OUT_DIR/rank-R.pt (its adapter's weights), and the Trainer writes the checkpoint once.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from colo import AdamParams, Datum, SamplingParams, Trainer
from colo.types import SampleJob

model_dir, out = sys.argv[1], Path(sys.argv[2])


def flag(name: str, default=None):
    return float(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


die_after, hang_after, timeout = flag("--die-after-step"), flag("--hang-after-step"), flag("--timeout", 60)
rank = int(os.environ.get("RANK", "0"))

engine = sys.argv[sys.argv.index("--engine") + 1] if "--engine" in sys.argv else "pytorch"
trainer = Trainer(model=model_dir, engine=engine, dtype="float32", device="cpu", max_lora_rank=16,
                  collective_timeout_seconds=timeout, tensor_parallel_size=int(os.environ.get("WORLD_SIZE", "1")) if engine == "vllm" else 1)
tok = trainer.tokenizer
texts = ["the cat sat on the mat", "one two three four five six seven", "hello world", "a b c d e f g h i j",
         "red green blue", "what is the answer to this question please", "x y"]
# two groups of samples sharing a prompt (computed once per micro-batch), among datums sharing nothing
prompts = ["question: what is two plus two? answer:", "tell me a story about a dog named"]
completions = [" four", " it is four", " 4, of course", " five", " rex", " spot who ran"]
data = [Datum.from_sequence(tok.encode(t)) for t in texts]
data += [Datum.from_sequence(tok.encode(p + c)) for p in prompts for c in completions]
adapter = trainer.create_lora(rank=8, seed=5)
losses, logprob_lengths = [], []
for step in range(3):
    fb = trainer.forward_backward(adapter, data)
    losses.append(fb.metrics["loss:sum"])
    tokens = {k: fb.metrics[f"tokens_{k}:sum"] for k in ("computed", "unshared")}
    logprob_lengths.append([len(o["logprobs"]) for o in fb.loss_fn_outputs])
    trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
    if die_after is not None and step + 1 == die_after and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if hang_after is not None and step + 1 == hang_after and rank == 1:
        time.sleep(3600)

jobs = [SampleJob(adapter if i % 3 else None, tok.encode(t), 2, SamplingParams(max_tokens=6, seed=i))
        for i, t in enumerate(texts)]
results = trainer.sample_batch(jobs)
samples = [{"adapter": r.adapter, "version": r.adapter_version, "tokens": [s.tokens for s in r.sequences]}
           for r in results]
# the sampler's logprobs against the trainer's own, on every rank (the contract importance sampling needs)
gap = max(abs(a - b) for job, r in zip(jobs, results) for seq in r.sequences
          for a, b in zip(trainer.compute_logprobs(job.adapter, list(job.prompt) + seq.tokens)[len(job.prompt):],
                          seq.logprobs))
sampled_with = trainer.engine.name
switched = None
if "--switch-engine" in sys.argv:
    # another engine in the same processes: the old one's shutdown must leave the ranks' process group (the
    # launcher's) as it was, and training and sampling go on
    world = torch.distributed.group.WORLD
    trainer.set_engine(sys.argv[sys.argv.index("--switch-engine") + 1])
    same_group = torch.distributed.is_initialized() and torch.distributed.group.WORLD is world
    trainer.forward_backward(adapter, data)  # sums gradients over the ranks
    trainer.optim_step(adapter, AdamParams(learning_rate=0.0))
    again = trainer.sample_batch(jobs)
    switched = {"same_group": same_group, "engine": trainer.engine.name,
                "versions": sorted({r.adapter_version for r in again if r.adapter is not None})}
saved = trainer.save_state(adapter, out / "checkpoint.safetensors")
(out / f"rank-{rank}.json").write_text(json.dumps({
    "world": trainer.ranks.world, "losses": losses, "logprob_lengths": logprob_lengths, "samples": samples,
    "saved": saved, "version": trainer.version(adapter), "engine": sampled_with, "logprob_gap": gap,
    "switched": switched, "tokens": tokens}))
torch.save({k: p.detach().clone() for k, p in trainer.adapters[adapter].params.items()}, out / f"rank-{rank}.pt")
trainer.close()
