"""Real-size models through colo: training memory and speed, sampling speed on both engines, publish time,
and the bf16 sampler/trainer logprob gap, for the default model and larger families' configurations.

Models: ``default`` is the embedded SmolLM2-135M-Instruct (its real weights). The others are built from
the published configuration of the model they name (sizes, vocabulary, tied output layer), with random
bf16 weights and the default model's tokenizer files: enough for time and memory, not for quality.
Their vocabularies (Qwen2.5: 151,936) are what the chunked logprobs and the sampler's per-token work
grow with. Token ids are drawn below the tokenizer's vocabulary.

Each (model, engine) runs in a fresh process: load, a rank-16 LoRA on every linear layer (train_unembed
off: the vllm engine applies an output-layer LoRA only to some architectures), one small warm-up step,
then the measured ``forward_backward`` of ``--batch`` x ``--length`` random tokens (``importance_sampling``,
fixed advantages) under the default micro-batch budget, the time to publish a new version to the engine
(median of 3 optimizer steps), and sampling ``--prompts`` prompts of 64 tokens x ``--new-tokens`` tokens. Training runs in the pytorch-engine
process only (the same work whatever the engine). Peak memory: the process's peak RSS above its RSS
before the measured call (on CUDA: peak allocated GPU memory).

    LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/model_sizes.py [--models default,qwen2.5-0.5b]
        [--engines pytorch,vllm] [--batch 64] [--length 512] [--prompts 32] [--new-tokens 128] [--device cpu|cuda]

On a GPU: ``--device cuda --models default,qwen2.5-1.5b,llama-3.1-8b`` (the vllm engine where vLLM is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, table, write_section  # noqa: E402

# published configurations (config.json on the hub), the fields that set size and cost
CONFIGS = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5,
                                         tie_word_embeddings=False)),
}

WORKLOAD = r"""
import json, sys, time
import torch
from colo import AdamParams, Datum, SampleJob, SamplingParams, Trainer

model, engine, device, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

def memory(peak):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    field = "VmHWM" if peak else "VmRSS"
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

started = time.perf_counter()
t = Trainer(model=model, engine=engine, dtype="bfloat16", device=device, max_lora_rank=16,
            max_model_len=max(args["length"], 64 + args["new_tokens"]) + 1)
out = {"load_s": time.perf_counter() - started, "vocab": t.policy.vocab_size,
       "params": sum(p.numel() for p in t.policy._base.parameters())}
adapter = t.create_lora(rank=16, seed=0)
gen = torch.Generator().manual_seed(0)
top = min(len(t.tokenizer), t.policy.vocab_size)

def datums(n, width):
    rows = torch.randint(0, top, (n, width + 1), generator=gen).tolist()
    return [Datum(r[:-1], {"target_tokens": torch.tensor(r[1:]), "logprobs": torch.full((width,), -2.0),
                           "advantages": torch.full((width,), 0.5)}) for r in rows]

t.forward_backward(adapter, datums(2, 32), "importance_sampling")  # warm-up
t.optim_step(adapter, AdamParams(learning_rate=0.0))
# publishing a new version to this engine: the median of 3 optimizer steps
publish = []
for _ in range(3):
    t.forward_backward(adapter, datums(1, 16), "importance_sampling")
    publish.append(t.optim_step(adapter, AdamParams(learning_rate=0.0)).metrics["publish_seconds:sum"])
out["publish_s"] = sorted(publish)[1]
if args["train"]:
    data = datums(args["batch"], args["length"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = memory(False)
    started = time.perf_counter()
    t.forward_backward(adapter, data, "importance_sampling")
    out["train_s"] = time.perf_counter() - started
    out["train_peak_bytes"] = memory(True) - before
prompts = torch.randint(0, top, (args["prompts"], 64), generator=gen).tolist()
params = SamplingParams(max_tokens=args["new_tokens"], seed=0)
t.sample(adapter, prompts[:2], 1, SamplingParams(max_tokens=4, seed=0))  # warm-up
started = time.perf_counter()
results = t.sample_batch([SampleJob(adapter, p, 1, params) for p in prompts])
out["sample_s"] = time.perf_counter() - started
out["sampled_tokens"] = sum(len(s.tokens) for r in results for s in r.sequences)
gaps = []
for p, r in zip(prompts[:4], results[:4]):
    seq = r.sequences[0]
    ours = t.compute_logprobs(adapter, p + seq.tokens)[len(p):]
    gaps += [abs(a - b) for a, b in zip(ours, seq.logprobs)]
out["gap_mean"], out["gap_max"] = sum(gaps) / len(gaps), max(gaps)
out["peak_rss_bytes"] = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
t.close()
print("RESULT " + json.dumps(out), flush=True)
"""


def build(name: str, out: Path) -> str:
    """The model directory for ``name``: the default model's, or a random one from a published configuration."""
    import torch
    import transformers

    from colo.default_model import resolve_model

    default = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", str(Path("~/.cache/colo/models").expanduser()))
    if name == "default":
        return default
    class_name, sizes = CONFIGS[name]
    folder = out / name
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(default)
        tokenizer.save_pretrained(folder)
        config = getattr(transformers, class_name)(**sizes, torch_dtype="bfloat16",
                                                   bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
    return str(folder)


def run(model_dir: str, engine: str, device: str, args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", WORKLOAD, model_dir, engine, device, json.dumps(args)],
                          capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="default,qwen2.5-0.5b")
    parser.add_argument("--engines", default="pytorch,vllm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave BENCHMARKS.md")
    a = parser.parse_args()
    work = Path(tempfile.gettempdir()) / "colo-model-sizes"
    rows, notes = [], []
    for name in a.models.split(","):
        model_dir = build(name, work)
        for i, engine in enumerate(a.engines.split(",")):
            args = {"batch": a.batch, "length": a.length, "prompts": a.prompts, "new_tokens": a.new_tokens,
                    "train": i == 0}
            r = run(model_dir, engine, a.device, args)
            print(name, engine, json.dumps(r), flush=True)
            if "error" in r:
                rows.append([name, "", engine, "error: " + r["error"]] + [""] * 5)
                continue
            tokens = a.batch * a.length
            if "train_s" in r:
                notes.append(f"{name}: the whole batch's logits in float32 would take "
                             f"{tokens * r['vocab'] * 4 / 2**30:.1f} GiB; forward_backward's peak was "
                             f"{r['train_peak_bytes'] / 2**30:.2f} GiB")
            rows.append([name, f"{r['params'] / 1e9:.2f}B, vocab {r['vocab']:,}", engine,
                         f"{r['train_peak_bytes'] / 2**30:.2f}" if "train_s" in r else "",
                         f"{tokens / r['train_s']:.0f}" if "train_s" in r else "",
                         f"{r['publish_s'] * 1000:.1f}",
                         f"{r['sampled_tokens'] / r['sample_s']:.1f}",
                         f"{r['gap_mean']:.2e} / {r['gap_max']:.2e}", f"{r['peak_rss_bytes'] / 2**30:.2f}"])
    headers = ["model", "size", "engine", f"forward_backward peak GiB ({a.batch} x {a.length})",
               "train tokens/s", "publish ms", f"sample tokens/s ({a.prompts} x {a.new_tokens})",
               "bf16 logprob gap mean / max", "process peak RSS GiB"]
    body = table(headers, rows) + "\n\n" + "\n".join(f"- {n}." for n in notes)
    print(body)
    if a.no_write:
        return
    write_section("model_sizes", f"""## Model sizes: the default model and a 0.5B-class configuration

bf16, LoRA rank 16 on every linear layer, default micro-batch budget (COLO_MICROBATCH_TOKENS=4096) and
gradient checkpointing; random weights for every model but the default (time and memory only: the gap on
random weights is small because their distributions are flat). Each engine in a fresh process; training in
the first engine's process. One run per row (a 0.5B row takes about 7 minutes on 2 cores): no spread. Device {a.device}.

Machine: {machine()}.

{body}

Command: `LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/model_sizes.py --models {a.models} --engines {a.engines} --batch {a.batch} --length {a.length} --prompts {a.prompts} --new-tokens {a.new_tokens} --device {a.device}`
""")


if __name__ == "__main__":
    main()
