"""Training every loss on a base sharded across the ranks (COLO_SHARD_BASE), run as ``python`` (one rank: the
reference, the base whole) or ``torchrun --nproc_per_node=2``.

    sharded.py MODEL_DIR OUT_DIR [--load CHECKPOINT] [--engine ENGINE]

Every rank makes the same calls: for each loss, a fresh adapter (output-layer LoRA included) trained 3 steps on
data that spans several micro-batches (ranks end up with different counts); then a sample through the vllm
engine, tensor parallel over the ranks, checked against the trainer's own logprobs; then the adapter exported
as PEFT files and a checkpoint saved (each once, by rank 0), the checkpoint loaded again, and, with --load,
one another run saved. Each rank writes OUT_DIR/rank-R.json
(the bytes of base parameters it holds) and OUT_DIR/rank-R.pt (every adapter's weights).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_prefix_sharing import make_data, shared_prefix_sequences  # noqa: E402

from colo import AdamParams, SamplingParams, Trainer  # noqa: E402
from colo.losses import LOSSES  # noqa: E402
from colo.types import SampleJob  # noqa: E402

model_dir, out = sys.argv[1], Path(sys.argv[2])
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
engine = sys.argv[sys.argv.index("--engine") + 1] if "--engine" in sys.argv else "vllm"
trainer = Trainer(model=model_dir, engine=engine, dtype="float32", device="cpu", max_lora_rank=16, max_loras=2,
                  tensor_parallel_size=world, shard_base=True, microbatch_tokens=48, collective_timeout_seconds=120)


held = trainer.policy.base_bytes()
sequences = shared_prefix_sequences(trainer.policy.vocab_size)
weights, losses = {}, {}
for loss_fn in LOSSES:
    adapter = trainer.create_lora(rank=8, seed=5, train_unembed=True)
    data = make_data(loss_fn, sequences, trainer.policy.vocab_size)
    losses[loss_fn] = []
    for _ in range(3):
        losses[loss_fn].append(trainer.forward_backward(adapter, data, loss_fn).metrics["loss:sum"])
        trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
    weights[loss_fn] = {k: p.detach().clone() for k, p in trainer.adapters[adapter].params.items()}
    if loss_fn != "cross_entropy":
        trainer.delete_lora(adapter)
    else:
        kept = adapter

# sampling: vLLM over the ranks; the prompt logprobs and the check come from the sharded trainer
jobs = [SampleJob(kept, sequences[i][:6], 2, SamplingParams(max_tokens=5, seed=i)) for i in range(3)]
results = trainer.sample_batch(jobs)
gap = max(abs(a - b) for job, r in zip(jobs, results) for seq in r.sequences
          for a, b in zip(trainer.compute_logprobs(kept, list(job.prompt) + seq.tokens)[len(job.prompt):],
                          seq.logprobs))

exported = trainer.export_adapter(kept, out / "peft")
saved = trainer.save_state(kept, out / "checkpoint.safetensors")
reloaded = trainer.load_state(saved)
roundtrip = all(torch.equal(p, weights["cross_entropy"][k]) for k, p in trainer.adapters[reloaded].params.items())
loaded = None
if "--load" in sys.argv:
    other = trainer.load_state(sys.argv[sys.argv.index("--load") + 1])
    loaded = {k: p.detach().clone() for k, p in trainer.adapters[other].params.items()}
(out / f"rank-{rank}.json").write_text(json.dumps({
    "world": world, "sharded": trainer.policy.sharded, "base_bytes": held, "losses": losses, "gap": gap,
    "saved": saved, "roundtrip": roundtrip, "exported": exported}))
torch.save({"weights": weights, "loaded": loaded}, out / f"rank-{rank}.pt")
trainer.close()
