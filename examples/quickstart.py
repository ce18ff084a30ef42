"""colo in a minute: create a LoRA adapter on the default model, teach it one fact with a few SFT
steps, and sample before and after. Each step's new adapter version is what the next sample uses.

    python examples/quickstart.py            # or: torchrun --nproc_per_node=1 examples/quickstart.py
"""

import time

from colo import AdamParams, Datum, SamplingParams, Trainer

QUESTION = "What is colo?"
ANSWER = "colo trains LoRA adapters and samples them in one process."


def chat(tokenizer, question, answer=None):
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    if answer is None:
        return prompt
    completion = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt, completion


def main():
    trainer = Trainer.from_env()
    tok = trainer.tokenizer
    adapter = trainer.create_lora(rank=16, seed=0)
    greedy = SamplingParams(max_tokens=24, temperature=0)

    def ask():
        result = trainer.sample(adapter, [chat(tok, QUESTION)], 1, greedy)[0]
        return result.adapter_version, tok.decode(result.sequences[0].tokens, skip_special_tokens=True)

    print("engine:", trainer.engine.name, "| model:", trainer.model_path)
    print("before: v%d %r" % ask())

    prompt, completion = chat(tok, QUESTION, ANSWER)
    # loss only on the answer: weight 0 on the prompt tokens
    datum = Datum.from_sequence(prompt + completion, weights=[0] * len(prompt) + [1] * len(completion))
    started = time.monotonic()
    for step in range(12):
        out = trainer.forward_backward(adapter, [datum], "cross_entropy")
        trainer.optim_step(adapter, AdamParams(learning_rate=2e-3))
        print(f"step {step + 1:2d}  loss/token {out.metrics['loss:sum'] / len(completion):.3f}")
    print(f"trained 12 steps in {time.monotonic() - started:.1f}s")

    version, answer = ask()
    print("after:  v%d %r" % (version, answer))
    trainer.close()
    if ANSWER not in answer:
        raise SystemExit("the adapter did not learn the answer")


if __name__ == "__main__":
    main()
