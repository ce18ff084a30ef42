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


def test_dro_rewards_logprobs_and_pulls_them_toward_the_sampler():
    loss, grad = run("dro", RL_INPUTS, {"beta": 0.05})
    # objective per token: lp * A - 0.025 * (lp - q)^2 = -1, 2 - 0.00625, -1, -0.5 - 0.00625
    assert loss == pytest.approx(0.5125)
    assert grad == pytest.approx([-1.0, 0.975, -2.0, -0.975])  # -(A - beta * (lp - q))


def test_dro_leaves_out_positions_that_were_not_sampled():
    lp = torch.tensor(LP + [-3.0], requires_grad=True)  # a prompt position: sampler logprob 0, advantage 0
    inputs = {"logprobs": torch.tensor(SAMPLER_LP + [0.0]), "advantages": torch.tensor(ADV + [0.0])}
    loss = LOSSES["dro"].fn(lp, inputs, {"beta": 0.05})
    loss.backward()
    assert loss.item() == pytest.approx(0.5125) and lp.grad[-1].item() == 0.0


def test_gspo_clips_one_ratio_per_sequence():
    inputs = {**RL_INPUTS, "sequence_ratio_mask": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    loss, grad = run("gspo", inputs, CLIP)
    s = math.exp(-0.25)  # the geometric mean of p/q over the masked tokens: exp(mean(0, -0.5))
    # A > 0: min(s A, 0.8 A) = s A (the ratio's own branch); A = -1: min(-s, -0.8) = -0.8 (clipped, no gradient)
    assert loss == pytest.approx(-(s * 1 - 0.8 + s * 2 + s * 1))
    assert grad == pytest.approx([-s, 0.0, -2 * s, -s])


def test_gspo_without_a_mask_uses_the_trained_tokens_and_its_paper_thresholds():
    # over all four tokens the mean log ratio is 0: s = 1, inside [1 - 3e-4, 1 + 4e-4]
    loss, grad = run("gspo", RL_INPUTS, dict(LOSSES["gspo"].defaults))
    assert loss == pytest.approx(-(1 - 1 + 2 + 1))
    assert grad == pytest.approx([-1.0, 1.0, -2.0, -1.0])


def test_stable_reinforce_truncates_the_importance_weight_and_holds_it_constant():
    loss, grad = run("stable_reinforce", RL_INPUTS, {"truncation": 2.0, "kl_coeff": 0.0})
    w = [1.0, math.exp(-0.5), 1.0, math.exp(0.5)]
    assert loss == pytest.approx(-(w[0] * 1 * -1.0 + w[1] * -1 * -2.0 + w[2] * 2 * -0.5 + w[3] * 1 * -0.5))
    assert grad == pytest.approx([-1.0, w[1], -2.0, -w[3]])  # -w A: the weight carries no gradient
    _, grad = run("stable_reinforce", RL_INPUTS, {"truncation": 1.2, "kl_coeff": 0.0})
    assert grad[3] == pytest.approx(-1.2)  # e^0.5 = 1.65, cut to 1.2


def test_stable_reinforce_kl_penalty():
    base, base_grad = run("stable_reinforce", RL_INPUTS, {"truncation": 2.0, "kl_coeff": 0.0})
    loss, grad = run("stable_reinforce", RL_INPUTS, {"truncation": 2.0, "kl_coeff": 0.1})
    assert loss - base == pytest.approx(0.05 * (0.25 + 0.25))  # kl/2 * sum (lp - q)^2
    assert [g - b for g, b in zip(grad, base_grad)] == pytest.approx([0.0, -0.05, 0.0, 0.05])  # kl * (lp - q)


@pytest.mark.parametrize("loss_fn", list(LOSSES))
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
