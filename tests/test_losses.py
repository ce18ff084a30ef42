"""Each loss against values worked out by hand on a four-token example."""

import math

import pytest
import torch

from colo import Datum
from colo.losses import LOSSES
from helpers import REFERENCE_LOSSES

LP = [-1.0, -2.0, -0.5, -0.5]  # trainer logprobs
SAMPLER_LP = [-1.0, -1.5, -0.5, -1.0]  # ratios: 1, e^-0.5 (0.6065), 1, e^0.5 (1.6487)
ADV = [1.0, -1.0, 2.0, 1.0]
RL_INPUTS = {"logprobs": torch.tensor(SAMPLER_LP), "advantages": torch.tensor(ADV)}
CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


def run(name, inputs, config):
    lp = torch.tensor(LP, requires_grad=True)
    loss = LOSSES[name].fn(lp, inputs, config)
    loss.backward()
    return loss.item(), lp.grad.tolist()


def test_cross_entropy_weights_each_token():
    loss, grad = run("cross_entropy", {"weights": torch.tensor([1.0, 0.0, 2.0, 0.0])}, {})
    assert loss == pytest.approx(1.0 + 0.0 + 1.0 + 0.0)
    assert grad == pytest.approx([-1.0, 0.0, -2.0, 0.0])


def test_importance_sampling():
    loss, grad = run("importance_sampling", RL_INPUTS, {})
    assert loss == pytest.approx(-(1 - math.exp(-0.5) + 2 + math.exp(0.5)))
    assert grad == pytest.approx([-1.0, math.exp(-0.5), -2.0, -math.exp(0.5)])


def test_ppo_clips_the_ratio_on_the_pessimistic_side():
    loss, grad = run("ppo", RL_INPUTS, CLIP)
    # token 1: min(-0.6065, 0.8 * -1) = -0.8 (clipped); token 3: min(1.6487, 1.2) = 1.2 (clipped)
    assert loss == pytest.approx(-(1 - 0.8 + 2 + 1.2))
    assert grad == pytest.approx([-1.0, 0.0, -2.0, 0.0])  # clipped tokens pass no gradient


def test_ppo_with_wide_thresholds_is_importance_sampling():
    wide = {"clip_low_threshold": 0.1, "clip_high_threshold": 10.0}
    assert run("ppo", RL_INPUTS, wide)[0] == pytest.approx(run("importance_sampling", RL_INPUTS, {})[0])


def test_cispo_weights_logprobs_by_the_detached_clipped_ratio():
    loss, grad = run("cispo", RL_INPUTS, CLIP)
    # clipped ratios 1, 0.8, 1, 1.2
    assert loss == pytest.approx(-(1 * -1.0 * 1 + 0.8 * -2.0 * -1 + 1 * -0.5 * 2 + 1.2 * -0.5 * 1))
    assert grad == pytest.approx([-1.0, 0.8, -2.0, -1.2])


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo", "cispo"])
def test_trainer_reports_the_sum_of_the_loss_over_data(trainer, adapter, loss_fn):
    tokens = [[5, 9, 17, 33, 8], [40, 41, 42]]
    data = []
    for i, seq in enumerate(tokens):
        n = len(seq) - 1
        inputs = {"target_tokens": torch.tensor(seq[1:])}
        if loss_fn == "cross_entropy":
            inputs["weights"] = torch.linspace(0.5, 1.5, n)
        else:
            inputs["logprobs"] = torch.full((n,), -3.0 - i)
            inputs["advantages"] = torch.linspace(-1.0, 1.0, n)
        data.append(Datum(seq[:-1], inputs))
    out = trainer.forward(adapter, data, loss_fn)
    # each datum's loss from its reported logprobs, by the formulas written out in helpers.py
    expected = sum(REFERENCE_LOSSES[loss_fn](o["logprobs"], {k: v.float() for k, v in d.loss_fn_inputs.items()})
                   for o, d in zip(out.loss_fn_outputs, data))
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5)
    for o, seq in zip(out.loss_fn_outputs, tokens):
        assert o["logprobs"].shape == (len(seq) - 1,)
        assert (o["logprobs"] <= 0).all()
    assert all(key.count(":") == 1 for key in out.metrics)
