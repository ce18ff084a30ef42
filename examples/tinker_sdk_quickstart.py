"""The official ``tinker`` SDK against colo: SFT one fact into a LoRA adapter, then sample it.

Start the service first (it serves the default model on 127.0.0.1:8000):

    .venv/bin/torchrun --nproc_per_node=1 torchrun_entry.py

then, in another shell:

    TINKER_API_KEY=tml-local .venv/bin/python examples/tinker_sdk_quickstart.py [--base-url URL]

Nothing here is colo-specific: this is plain SDK code with ``base_url`` pointing at your machine.
"""

import argparse
import os

import numpy as np
import tinker
from tinker import types

QUESTION = "What is colo?"
ANSWER = "colo trains LoRA adapters and samples them in one process."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_API_KEY", "tml-local")  # the SDK insists on a key; an open colo takes any

    service = tinker.ServiceClient(base_url=args.base_url)
    base_model = tinker.RestClient(base_url=args.base_url).get_server_capabilities().result() \
        .supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base_model, rank=16).result()
    tokenizer = training.get_tokenizer()

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_dict=False)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = prompt + answer
    weights = np.array([0.0] * (len(prompt) - 1) + [1.0] * len(answer), dtype=np.float32)  # loss on the answer
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(tokens[1:]), "weights": weights})

    def ask(sampler) -> str:
        out = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                             types.SamplingParams(max_tokens=32, temperature=0.0)).result()
        return tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=True)

    print("model:", base_model)
    print("before:", repr(ask(training.save_weights_and_get_sampling_client().result())))
    for step in range(args.steps):
        fwd_bwd = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=1e-3))
        loss = fwd_bwd.result().metrics["loss:sum"]
        optim.result()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:2d}  loss {loss:.3f}")
    path = training.save_weights_for_sampler("quickstart").result().path
    print("saved", path)
    print("after: ", repr(ask(training.create_sampling_client(path).result())))


if __name__ == "__main__":
    main()
