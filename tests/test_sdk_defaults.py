"""The official SDK's plainest calls, with the SDK's own defaults (rank 8 at most asked, train_unembed=True),
against the service with its defaults on the embedded default model named by its hub id."""

from __future__ import annotations

import numpy as np
import tinker
from tinker import types

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_create_overfit_save_for_sampler_recite_and_agree(default_service):
    service_client = tinker.ServiceClient(base_url=default_service.url, api_key="tml-a-user")
    tc = service_client.create_lora_training_client(base_model=HUB_ID, rank=8)  # the SDK's defaults otherwise
    tokenizer = tc.get_tokenizer()
    tokens = tokenizer.encode("The secret city of Zorbia is called Quxville by its people.")
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)})
    first = None
    for _ in range(25):
        fb = tc.forward_backward([datum], "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=5e-3))
        loss = fb.result().metrics["loss:sum"]
        step.result()
        first = loss if first is None else first
    assert loss < first / 10, (first, loss)

    sampler = tc.save_weights_and_get_sampling_client().result()
    greedy = types.SamplingParams(max_tokens=len(tokens) - 4, temperature=0.0)
    recital = sampler.sample(types.ModelInput.from_ints(tokens[:4]), 1, greedy).result().sequences[0].tokens
    assert list(recital) == tokens[4:], tokenizer.decode(recital)

    # what the sampler reports for its own samples is what the trainer computes (bf16 on both sides)
    prompt = tokenizer.encode("Tell me about Zorbia.")
    out = sampler.sample(types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=16, seed=7)).result()
    gaps = []
    for seq in out.sequences:
        full = prompt + list(seq.tokens)
        d = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(full[1:], dtype=np.int64)})
        ours = tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()[len(prompt) - 1:]
        gaps += list(np.abs(ours - np.array(seq.logprobs)))
    assert np.mean(gaps) < 0.1, (np.mean(gaps), max(gaps))
    service_client.close("success").result()
