"""Small helpers shared by the tests."""

import torch

from colo import AdamParams, Datum


# The losses of colo.losses written out again independently, with the default clip thresholds (0.8, 1.2):
# references for tests of the Trainer's loss plumbing. ``x`` is a datum's loss_fn_inputs in float32.
CLIP = (0.8, 1.2)
REFERENCE_LOSSES = {
    "cross_entropy": lambda lp, x: -(x["weights"] * lp).sum(),
    "importance_sampling": lambda lp, x: -(torch.exp(lp - x["logprobs"]) * x["advantages"]).sum(),
    "ppo": lambda lp, x: -torch.minimum(torch.exp(lp - x["logprobs"]) * x["advantages"],
                                        torch.exp(lp - x["logprobs"]).clamp(*CLIP) * x["advantages"]).sum(),
    "cispo": lambda lp, x: -(torch.exp(lp - x["logprobs"]).clamp(*CLIP).detach() * lp * x["advantages"]).sum(),
    # beta 0.05; positions with sampler logprob and advantage both 0 were not sampled
    "dro": lambda lp, x: -(((x["logprobs"] != 0) | (x["advantages"] != 0))
                           * (lp * x["advantages"] - 0.025 * (lp - x["logprobs"]) ** 2)).sum(),
    # the sequence's ratio (geometric mean over nonzero-advantage tokens), each token's gradient, clip 1 -3e-4/+4e-4
    "gspo": lambda lp, x: _gspo(lp, x["logprobs"], x["advantages"]),
    # truncation 2, kl_coeff 0
    "stable_reinforce": lambda lp, x: -(torch.exp(lp - x["logprobs"]).clamp(max=2.0).detach() * lp
                                        * x["advantages"]).sum(),
}


def _gspo(lp, q, a):
    on = a != 0
    s = torch.exp((lp - q)[on].mean()).detach()
    per_token = s * torch.exp(lp - lp.detach())
    return -torch.minimum(per_token * a, per_token.clamp(1 - 3e-4, 1 + 4e-4) * a).sum()


def encode(trainer, text: str) -> list[int]:
    return trainer.tokenizer.encode(text)


def overfit(trainer, adapter: str, tokens: list[int], steps: int = 40, lr: float = 1e-2) -> None:
    datum = Datum.from_sequence(tokens)
    for _ in range(steps):
        trainer.forward_backward(adapter, [datum])
        trainer.optim_step(adapter, AdamParams(learning_rate=lr))


def snapshot(trainer) -> dict:
    """Every adapter's version, weights and optimizer state, copied."""
    return {
        a.id: (a.version, {k: p.detach().clone() for k, p in a.params.items()}, a.optimizer_tensors(),
               {k: None if p.grad is None else p.grad.clone() for k, p in a.params.items()})
        for a in trainer.adapters.values()
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for adapter_id, (version, weights, optim, grads) in before.items():
        v2, w2, o2, g2 = after[adapter_id]
        assert version == v2, adapter_id
        assert weights.keys() == w2.keys()
        for k in weights:
            assert torch.equal(weights[k], w2[k]), (adapter_id, k)
        assert optim.keys() == o2.keys()
        for k in optim:
            assert torch.equal(optim[k], o2[k]), (adapter_id, k)
        for k in grads:
            assert (grads[k] is None) == (g2[k] is None) and (grads[k] is None or torch.equal(grads[k], g2[k]))


def assert_same_draws(results, others, atol: float = 1e-5) -> None:
    """Two runs of the same sample jobs drew the same tokens, with logprobs within ``atol``."""
    import pytest

    for x, y in zip(results, others, strict=True):
        assert [s.tokens for s in x.sequences] == [s.tokens for s in y.sequences]
        for a, b in zip(x.sequences, y.sequences):
            assert a.logprobs == pytest.approx(b.logprobs, abs=atol)


def one_shot(trainer, adapter, data, loss_fn):
    """Each datum through the model's own forward and logits (transformers' attention, nothing of colo's packing,
    chunking or sharing), padded in one batch: the loss, each datum's logprobs, the gradients (taken)."""
    width = max(len(d.model_input) for d in data)
    ids = torch.zeros((len(data), width), dtype=torch.long)
    mask = torch.zeros((len(data), width), dtype=torch.long)
    for b, d in enumerate(data):
        ids[b, : len(d.model_input)] = torch.tensor(d.model_input)
        mask[b, : len(d.model_input)] = 1
    with trainer.policy.active(adapter, train=True) as model:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        all_lp = torch.log_softmax(logits, dim=-1)
        total, lps = torch.zeros(()), []
        for b, d in enumerate(data):
            n = len(d.model_input)
            lp = all_lp[b, :n].gather(-1, d.loss_fn_inputs["target_tokens"][:, None]).squeeze(-1)
            lps.append(lp.detach())
            total = total + REFERENCE_LOSSES[loss_fn](lp, {k: v.float() for k, v in d.loss_fn_inputs.items()})
        total.backward()
    return float(total.detach()), lps, take_grads(trainer, adapter)


def take_grads(trainer, adapter) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in trainer.adapters[adapter].params.items()}
    for p in trainer.adapters[adapter].params.values():
        p.grad = None
    return grads
