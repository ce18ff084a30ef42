"""Training through the Trainer: the sampler sees the trained weights, adapters stay apart."""

import torch

from colo import AdamParams, Datum, SamplingParams
from helpers import encode, overfit

SEQ_A = "the cat sat on a mat and ran to the big red tree"
SEQ_B = "hello world what is one plus two answer yes three"


def recite(trainer, adapter, tokens, prefix=3):
    params = SamplingParams(max_tokens=len(tokens) - prefix, temperature=0)
    return trainer.sample(adapter, [tokens[:prefix]], 1, params)[0]


def test_overfit_sequence_is_recited_by_greedy_sampling(trainer, adapter):
    tokens = encode(trainer, SEQ_A)
    assert recite(trainer, adapter, tokens).sequences[0].tokens != tokens[3:]  # not known before training
    overfit(trainer, adapter, tokens)
    result = recite(trainer, adapter, tokens)
    assert result.sequences[0].tokens == tokens[3:]
    assert result.adapter_version == trainer.version(adapter) == 40


def test_two_adapters_trained_on_different_sequences_do_not_interfere(trainer, make_adapter):
    a, b = make_adapter(seed=2), make_adapter(seed=3)
    seq_a, seq_b = encode(trainer, SEQ_A), encode(trainer, SEQ_B)
    for _ in range(40):  # interleaved, as two users of one server would be
        trainer.forward_backward(a, [Datum.from_sequence(seq_a)])
        trainer.forward_backward(b, [Datum.from_sequence(seq_b)])
        trainer.optim_step(a, AdamParams(learning_rate=1e-2))
        trainer.optim_step(b, AdamParams(learning_rate=1e-2))
    assert recite(trainer, a, seq_a).sequences[0].tokens == seq_a[3:]
    assert recite(trainer, b, seq_b).sequences[0].tokens == seq_b[3:]
    # a step of b leaves a's weights exactly as they were
    before = {k: p.detach().clone() for k, p in trainer.adapters[a].params.items()}
    trainer.forward_backward(b, [Datum.from_sequence(seq_b)])
    trainer.optim_step(b, AdamParams(learning_rate=1e-2))
    assert all(torch.equal(before[k], p) for k, p in trainer.adapters[a].params.items())


def test_base_model_is_untouched_by_training(trainer, adapter):
    tokens = encode(trainer, SEQ_B)
    before = trainer.compute_logprobs(None, tokens)
    overfit(trainer, adapter, tokens, steps=5)
    assert trainer.compute_logprobs(None, tokens) == before
    assert trainer.compute_logprobs(adapter, tokens) != before


def test_gradients_accumulate_until_the_step(trainer, make_adapter):
    # two forward_backward calls on halves == one call on the whole batch
    one, two = make_adapter(seed=7), make_adapter(seed=7)
    data = [Datum.from_sequence(encode(trainer, SEQ_A)), Datum.from_sequence(encode(trainer, SEQ_B))]
    trainer.forward_backward(one, data)
    trainer.forward_backward(two, data[:1])
    trainer.forward_backward(two, data[1:])
    for k, p in trainer.adapters[one].params.items():
        assert torch.allclose(p.grad, trainer.adapters[two].params[k].grad, atol=1e-6)


def test_gradient_clipping_bounds_the_update(trainer, make_adapter):
    clipped, free = make_adapter(seed=11), make_adapter(seed=11)
    datum = Datum.from_sequence(encode(trainer, SEQ_A))
    norms = []
    for a, clip in ((clipped, 1e-3), (free, 0.0)):
        trainer.forward_backward(a, [datum])
        out = trainer.optim_step(a, AdamParams(learning_rate=1e-3, grad_clip_norm=clip))
        norms.append(out.metrics["grad_norm:mean"])
    assert norms[0] == norms[1] > 1e-3  # the reported norm is the unclipped one
    # Adam normalises the step size, so compare the second moments, which see the clipped gradient
    v_clip = trainer.adapters[clipped].optimizer_tensors()
    v_free = trainer.adapters[free].optimizer_tensors()
    k = next(k for k in v_clip if k.endswith("exp_avg_sq") and v_free[k].abs().sum() > 0)
    assert v_clip[k].sum() < v_free[k].sum()
