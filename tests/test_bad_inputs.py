"""Bad input: one typed error with a clear message, and no adapter, optimizer state or checkpoint changed."""

import hashlib
import math

import pytest
import torch

from colo import (AdamParams, CheckpointError, ColoError, ContextLengthError, Datum, InvalidRequestError,
                  SamplingParams, UnknownAdapterError)
from helpers import assert_same_snapshot, encode, snapshot

GOOD = [3, 17, 40, 9, 12]


@pytest.fixture
def world(trainer, make_adapter, tmp_path):
    """Two adapters with weights, optimizer state and pending gradients, plus a checkpoint on disk."""
    a, b = make_adapter(seed=1), make_adapter(seed=2)
    for adapter in (a, b):
        trainer.forward_backward(adapter, [Datum.from_sequence(GOOD)])
        trainer.optim_step(adapter, AdamParams(learning_rate=1e-3))
        trainer.forward_backward(adapter, [Datum.from_sequence(GOOD)])  # gradients waiting for a step
    ckpt = trainer.save_state(a, tmp_path / "a.ckpt")
    return a, ckpt


def datum(model_input=GOOD[:-1], **inputs):
    inputs.setdefault("target_tokens", torch.tensor(GOOD[1:]))
    return Datum(model_input, inputs)


def rl_datum(**overrides):
    n = len(GOOD) - 1
    inputs = {"logprobs": torch.full((n,), -1.0), "advantages": torch.ones(n), **overrides}
    return datum(**inputs)


CASES = {
    # unknown adapter, everywhere an adapter is named
    "fb unknown adapter": (UnknownAdapterError, "unknown adapter 'nope'; known adapters: lora-",
                           lambda t, a, p: t.forward_backward("nope", [datum()])),
    "step unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.optim_step("nope")),
    "sample unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.sample("nope", [GOOD])),
    "logprobs unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.compute_logprobs("nope", GOOD)),
    "save unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.save_state("nope", p)),
    "export unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.export_adapter("nope", p + ".d")),
    "delete unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.delete_lora("nope")),
    "load over unknown adapter": (UnknownAdapterError, "unknown adapter", lambda t, a, p: t.load_state(p, adapter="nope")),
    # LoRA shape
    "rank above maximum": (InvalidRequestError, r"LoRA rank 17; allowed: an integer in \[1, 16\] \(COLO_MAX_LORA_RANK\)",
                           lambda t, a, p: t.create_lora(rank=17)),
    "rank zero": (InvalidRequestError, "LoRA rank 0", lambda t, a, p: t.create_lora(rank=0)),
    "no layer trained": (InvalidRequestError, "trains no layer",
                         lambda t, a, p: t.create_lora(rank=4, train_attn=False, train_mlp=False)),
    "negative alpha": (InvalidRequestError, "alpha", lambda t, a, p: t.create_lora(rank=4, alpha=-1)),
    # token ids outside the vocabulary
    "input token outside vocab": (InvalidRequestError, r"data\[0\].model_input has token id 512; allowed: token ids in \[0, 512\)",
                                  lambda t, a, p: t.forward_backward(a, [datum([3, 512, 4, 5])])),
    "negative token": (InvalidRequestError, "token id -1", lambda t, a, p: t.forward_backward(a, [datum([3, -1, 4, 5])])),
    "target outside vocab": (InvalidRequestError, "target_tokens.*token id 9999",
                             lambda t, a, p: t.forward_backward(a, [datum(target_tokens=torch.tensor([1, 2, 3, 9999]))])),
    "prompt token outside vocab": (InvalidRequestError, r"prompts\[1\] has token id 100000",
                                   lambda t, a, p: t.sample(a, [GOOD, [100000]])),
    "stop token outside vocab": (InvalidRequestError, "SamplingParams.stop has token id 600",
                                 lambda t, a, p: t.sample(a, [GOOD], params=SamplingParams(stop=[600]))),
    "scored token outside vocab": (InvalidRequestError, "token id 512", lambda t, a, p: t.compute_logprobs(a, [1, 512])),
    # longer than the context
    "prompt longer than context": (ContextLengthError, r"prompts\[0\] is 300 tokens long; allowed: at most 255",
                                   lambda t, a, p: t.sample(a, [[5] * 300])),
    "datum longer than context": (ContextLengthError, "is 257 tokens long; allowed: at most 256",
                                  lambda t, a, p: t.forward_backward(a, [Datum.from_sequence([5] * 258)])),
    # empty
    "empty batch": (InvalidRequestError, "data is empty", lambda t, a, p: t.forward_backward(a, [])),
    "empty datum": (InvalidRequestError, "model_input is empty", lambda t, a, p: t.forward_backward(a, [datum([], target_tokens=torch.tensor([], dtype=torch.long))])),
    "no prompts": (InvalidRequestError, "prompts is empty", lambda t, a, p: t.sample(a, [])),
    "empty prompt": (InvalidRequestError, r"prompts\[0\] is empty", lambda t, a, p: t.sample(a, [[]])),
    # malformed training requests
    "unknown loss": (InvalidRequestError, "unknown loss_fn 'dpo'; allowed: cross_entropy, importance_sampling, ppo, cispo",
                     lambda t, a, p: t.forward_backward(a, [datum()], "dpo")),
    "missing rl inputs": (InvalidRequestError, "lacks logprobs, advantages",
                          lambda t, a, p: t.forward_backward(a, [datum()], "ppo")),
    "wrong length": (InvalidRequestError, r"\['weights'\] has shape \(3,\); allowed: \(4,\)",
                     lambda t, a, p: t.forward_backward(a, [datum(weights=torch.ones(3))])),
    "unknown input key": (InvalidRequestError, "has 'advantage'",
                          lambda t, a, p: t.forward_backward(a, [datum(advantage=torch.ones(4))])),
    "nan advantages": (InvalidRequestError, "NaN or inf",
                       lambda t, a, p: t.forward_backward(a, [rl_datum(advantages=torch.full((4,), math.nan))], "importance_sampling")),
    "float targets": (InvalidRequestError, "integer token ids",
                      lambda t, a, p: t.forward_backward(a, [datum(target_tokens=torch.ones(4))])),
    "unknown loss config": (InvalidRequestError, "'clip' is not used by ppo; allowed: clip_low_threshold, clip_high_threshold",
                            lambda t, a, p: t.forward_backward(a, [rl_datum()], "ppo", {"clip": 0.2})),
    "not a datum": (InvalidRequestError, r"data\[0\] is a dict", lambda t, a, p: t.forward_backward(a, [{"model_input": GOOD}])),
    # bad hyperparameters
    "negative lr": (InvalidRequestError, "AdamParams.learning_rate=-1.0; allowed: in \\[0, 1\\]",
                    lambda t, a, p: t.optim_step(a, AdamParams(learning_rate=-1.0))),
    "beta1 of one": (InvalidRequestError, r"beta1=1.0; allowed: in \[0, 1\)", lambda t, a, p: t.optim_step(a, AdamParams(beta1=1.0))),
    "nan lr": (InvalidRequestError, "learning_rate=nan", lambda t, a, p: t.optim_step(a, AdamParams(learning_rate=math.nan))),
    "zero max_tokens": (InvalidRequestError, "max_tokens=0", lambda t, a, p: t.sample(a, [GOOD], params=SamplingParams(max_tokens=0))),
    "negative temperature": (InvalidRequestError, "temperature=-1", lambda t, a, p: t.sample(a, [GOOD], params=SamplingParams(temperature=-1))),
    "top_p zero": (InvalidRequestError, "top_p=0", lambda t, a, p: t.sample(a, [GOOD], params=SamplingParams(top_p=0))),
    "top_k zero": (InvalidRequestError, "top_k=0", lambda t, a, p: t.sample(a, [GOOD], params=SamplingParams(top_k=0))),
    "zero samples": (InvalidRequestError, "num_samples=0", lambda t, a, p: t.sample(a, [GOOD], 0)),
    "prompt not tokens": (InvalidRequestError, r"prompts\[0\] is not a list of token ids \(str\)",
                          lambda t, a, p: t.sample(a, ["hello"])),
    "fractional token": (InvalidRequestError, "non-integer token id", lambda t, a, p: t.compute_logprobs(a, [1, 2.5])),
    "empty stop string": (InvalidRequestError, "empty string", lambda t, a, p: t.sample(a, [GOOD], params=SamplingParams(stop=[""]))),
    # checkpoints
    "save over a directory": (CheckpointError, "is a directory", lambda t, a, p: t.save_state(a, p.rsplit("/", 1)[0])),
    "export over a file": (CheckpointError, "is a file", lambda t, a, p: t.export_adapter(a, p)),
    "load a missing file": (CheckpointError, "no checkpoint", lambda t, a, p: t.load_state(p + ".missing")),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_raises_a_typed_error_and_changes_nothing(trainer, world, name):
    error, message, call = CASES[name]
    adapter, ckpt = world
    digest = hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    before = snapshot(trainer)
    with pytest.raises(error, match=message) as e:
        call(trainer, adapter, ckpt)
    assert isinstance(e.value, ColoError)
    assert "\n" not in str(e.value)
    assert_same_snapshot(before, snapshot(trainer))
    assert hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == digest


def test_load_of_a_checkpoint_from_another_shape_is_refused(trainer, world, make_adapter, tmp_path):
    adapter, ckpt = world
    other = make_adapter(rank=4)
    before = snapshot(trainer)
    with pytest.raises(CheckpointError, match="has LoRA"):
        trainer.load_state(ckpt, adapter=other)
    assert_same_snapshot(before, snapshot(trainer))


def test_non_finite_gradients_are_dropped_not_applied(trainer, world):
    adapter, _ = world
    weights = {k: p.detach().clone() for k, p in trainer.adapters[adapter].params.items()}
    version = trainer.version(adapter)
    huge = rl_datum(logprobs=torch.full((4,), -1e4), advantages=torch.ones(4))  # ratio e^(1e4) = inf
    trainer.forward_backward(adapter, [huge], "importance_sampling")
    with pytest.raises(InvalidRequestError, match="gradient norm of .* is (inf|nan)"):
        trainer.optim_step(adapter)
    assert trainer.version(adapter) == version
    assert all(torch.equal(weights[k], p) for k, p in trainer.adapters[adapter].params.items())
    assert all(p.grad is None for p in trainer.adapters[adapter].params.values())
