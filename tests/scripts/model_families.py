"""Each model family through colo, on each engine, in one process (one vLLM engine at a time).

    model_families.py WORK_DIR OUT.json FAMILY[,FAMILY...] ENGINE[,ENGINE...]

For every family (a key of tests/tiny_model.FAMILIES, built as a tiny random float32 model under WORK_DIR)
and engine, it records what happened as JSON: the largest sampler/trainer logprob gap after optimizer
steps with each set of train_* flags, whether a mixed batch (two adapters and the base model) equals each
alone (seeded draws), and, on the first engine, the exported PEFT adapter's logprobs in peft.PeftModel and a checkpoint's
round trip. A failure is recorded with its message, and the next case runs.
"""

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from colo import AdamParams, Datum, SampleJob, SamplingParams, Trainer  # noqa: E402
from tiny_model import build_tiny_family, corpus  # noqa: E402

work, out = Path(sys.argv[1]), Path(sys.argv[2])
families, engines = sys.argv[3].split(","), sys.argv[4].split(",")
FLAGS = {"attn+mlp": {}, "attn+mlp+unembed": {"train_unembed": True}, "attn": {"train_mlp": False},
         "mlp": {"train_attn": False}}
TEXT = " ".join(corpus(40, seed=3))  # past every sliding window of the tiny families (16 tokens)


def train(trainer, adapter, tokens, steps=2, lr=1e-2):
    data = [Datum.from_sequence(tokens[i: i + 48]) for i in (0, 16)]
    for _ in range(steps):
        trainer.forward_backward(adapter, data)
        trainer.optim_step(adapter, AdamParams(learning_rate=lr))


def gap(trainer, adapter, prompt, result):
    worst = 0.0
    for seq in result.sequences:
        ours = trainer.compute_logprobs(adapter, prompt + seq.tokens)[len(prompt):]
        worst = max([worst] + [abs(a - b) for a, b in zip(ours, seq.logprobs)])
    return worst


def run_case(fn):
    try:
        return fn()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)[-1500:]}


results = {}
for family in families:
    model_dir = work / family
    if not (model_dir / "config.json").exists():
        build_tiny_family(model_dir, family)
    for n, engine in enumerate(engines):
        key = f"{family}/{engine}"
        try:
            trainer = Trainer(model=str(model_dir), engine=engine, dtype="float32", device="cpu", max_lora_rank=16,
                              max_model_len=256)
        except Exception as e:
            results[key] = {"start": f"{type(e).__name__}: {e}"}
            continue
        tokens = trainer.tokenizer.encode(TEXT)
        prompt = tokens[:24]
        case = {"start": "ok"}

        for name, flags in FLAGS.items():
            def one(flags=flags):
                adapter = trainer.create_lora(rank=8, seed=1, **flags)
                try:
                    train(trainer, adapter, tokens)
                    result = trainer.sample(adapter, [prompt], 2, SamplingParams(max_tokens=24, seed=0))[0]
                    scored = trainer.sample_batch([SampleJob(adapter, tokens[:40], 1, SamplingParams(max_tokens=1),
                                                             prompt_logprobs=True)])[0].prompt_logprobs
                    ours = trainer.compute_logprobs(adapter, tokens[:40])
                    return {"sample_gap": gap(trainer, adapter, prompt, result),
                            "prompt_gap": max(abs(a - b) for a, b in zip(scored[1:], ours[1:]))}
                finally:
                    trainer.delete_lora(adapter)
            case[name] = run_case(one)

        def mixed():
            a, b = trainer.create_lora(rank=8, seed=2), trainer.create_lora(rank=8, seed=3)
            try:
                train(trainer, a, tokens)
                train(trainer, b, tokens[8:])
                seeded = SamplingParams(max_tokens=24, seed=7)  # seeded draws do not depend on the batch
                jobs = [SampleJob(a, prompt, 1, seeded), SampleJob(b, prompt, 1, seeded), SampleJob(None, prompt, 1, seeded)]
                together = [r.sequences[0] for r in trainer.sample_batch(jobs)]
                alone = [trainer.sample_batch([j])[0].sequences[0] for j in jobs]
                same = all(t.tokens == a.tokens and max(abs(x - y) for x, y in zip(t.logprobs, a.logprobs)) < 1e-4
                           for t, a in zip(together, alone))
                # each adapter's weights reached its rows: the three draws differ in tokens or logprobs
                distinct = len({(tuple(t.tokens), tuple(round(x, 3) for x in t.logprobs)) for t in together}) == 3
                return {"equal": same, "distinct": distinct}
            finally:
                trainer.delete_lora(a)
                trainer.delete_lora(b)
        case["mixed"] = run_case(mixed)

        if n == 0:
            def export():
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                adapter = trainer.create_lora(rank=8, seed=4, train_unembed=True)
                try:
                    train(trainer, adapter, tokens)
                    path = trainer.export_adapter(adapter, work / f"{family}-export")
                    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir,
                                                      dtype=torch.float32), path).eval()
                    ids = torch.tensor([tokens[:40]])
                    with torch.no_grad():
                        logits = model(input_ids=ids).logits.float()[0, :-1]
                    peft_lp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
                    ours = trainer.compute_logprobs(adapter, tokens[:40])[1:]
                    saved = trainer.save_state(adapter, work / f"{family}-ckpt.safetensors")
                    before = trainer.compute_logprobs(adapter, tokens[:40])
                    train(trainer, adapter, tokens, steps=1)
                    loaded = trainer.load_state(saved)
                    after = trainer.compute_logprobs(loaded, tokens[:40])
                    return {"peft_gap": max(abs(a - b) for a, b in zip(peft_lp, ours)),
                            "checkpoint_gap": max(abs(a - b) for a, b in zip(before[1:], after[1:]))}
                finally:
                    for a in list(trainer.adapters):
                        trainer.delete_lora(a)
            case["export"] = run_case(export)
        trainer.close()
        results[key] = case
        print(key, json.dumps(case)[:400], flush=True)
out.write_text(json.dumps(results, indent=1))
