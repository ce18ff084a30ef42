"""Three clients train their own adapters and sample at the same time, through one colo service.

Each client is a thread with its own official-SDK ServiceClient: it teaches its adapter a different
answer to the same question and samples between steps. colo serves their sample requests together
(one engine call across adapters), runs each model's training requests in order, and takes the
models in turn, so no client waits on another's whole run. Each ends answering with its own fact.

    .venv/bin/torchrun --nproc_per_node=1 torchrun_entry.py      # in one shell
    .venv/bin/python examples/concurrent_clients.py [--base-url URL]
"""

import argparse
import os
import threading
import time

import numpy as np
import tinker
from tinker import types

QUESTION = "What is your favourite colour?"
ANSWERS = ["My favourite colour is blue.", "I like green best.", "Red, always red."]


def run_client(i: int, base_url: str, steps: int, out: dict) -> None:
    service = tinker.ServiceClient(base_url=base_url)
    base_model = tinker.RestClient(base_url=base_url).get_server_capabilities().result() \
        .supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base_model, rank=16, seed=i).result()
    tok = training.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     return_dict=False)
    answer = tok.encode(ANSWERS[i], add_special_tokens=False) + [tok.eos_token_id]
    tokens = prompt + answer
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(tokens[1:]),
                                        "weights": np.array([0.0] * (len(prompt) - 1) + [1.0] * len(answer),
                                                            dtype=np.float32)})
    greedy = types.SamplingParams(max_tokens=16, temperature=0.0)
    started = time.monotonic()
    for step in range(steps):
        fwd_bwd = training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        loss = fwd_bwd.result().metrics["loss:sum"]
        if step % 5 == 4:
            sampler = training.save_weights_and_get_sampling_client().result()
            sample = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result().sequences[0]
            print(f"client {i} step {step + 1:2d} loss {loss:6.3f}: "
                  f"{tok.decode(sample.tokens, skip_special_tokens=True)!r}", flush=True)
    out[i] = (tok.decode(sample.tokens, skip_special_tokens=True), time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    out: dict[int, tuple[str, float]] = {}
    threads = [threading.Thread(target=run_client, args=(i, args.base_url, args.steps, out)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        answer, seconds = out.get(i, ("(failed)", 0.0))
        print(f"client {i}: taught {ANSWERS[i]!r}, answers {answer!r} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
