"""forward_backward and forward compute each shared prefix once (colo.packing, colo.packed_attention) and give
what each datum computed alone gives: logprobs within 1e-5, gradients within 1e-4 (relative), every loss.

The reference is the model's own forward (its logits, transformers' attention) over each datum separately,
padded, in one batch: nothing of colo's packing, chunking or attention is in it."""

import logging

import pytest
import torch

from colo import AdamParams, Datum, SamplingParams
from colo.packing import computed_tokens, pack, plan, units
from helpers import REFERENCE_LOSSES, one_shot, take_grads

def shared_prefix_sequences(vocab: int) -> list[list[int]]:
    """Groups sharing prompts of different lengths (20, 9, 3), samples that share more than the prompt, a datum
    that is another's whole prefix, two identical datums, and datums sharing nothing; shuffled. The same every
    call."""
    g = torch.Generator().manual_seed(3)

    def _tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    long_prompt, mid_prompt, short_prompt = _tokens(20), _tokens(9), _tokens(3)
    branch = long_prompt + _tokens(4)
    seqs = [long_prompt + _tokens(n) for n in (5, 11, 2, 7)]
    seqs += [branch + _tokens(n) for n in (3, 6)]  # a second level of sharing below the prompt
    seqs += [mid_prompt + _tokens(n) for n in (4, 1, 8)]
    seqs += [short_prompt + _tokens(n) for n in (12, 6)]
    seqs += [list(mid_prompt)]  # the whole of another group's prefix
    seqs += [list(seqs[0])]  # identical to a datum
    seqs += [_tokens(n) for n in (14, 5, 1)]  # nothing shared
    order = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i] for i in order]


def make_data(loss_fn: str, sequences: list[list[int]], vocab: int) -> list[Datum]:
    g = torch.Generator().manual_seed(11)
    data = []
    for seq in sequences:
        n = len(seq)
        inputs = {"target_tokens": torch.randint(3, vocab, (n,), generator=g)}
        if loss_fn == "cross_entropy":
            inputs["weights"] = torch.rand(n, generator=g)
        else:
            inputs["logprobs"] = -torch.rand(n, generator=g) * 6
            inputs["advantages"] = torch.randn(n, generator=g)
        data.append(Datum(list(seq), inputs))
    return data


def assert_matches(out, grads, expected):
    expected_loss, expected_lps, expected_grads = expected
    # a sum of about 400 float32 terms of up to 6 in another order: 1e-4 absolute
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-4)
    for o, lp in zip(out.loss_fn_outputs, expected_lps):
        assert o["logprobs"].shape == lp.shape
        assert torch.allclose(o["logprobs"], lp, atol=1e-5, rtol=0), (o["logprobs"] - lp).abs().max()
    for k, g in expected_grads.items():
        assert torch.linalg.vector_norm(grads[k] - g) <= 1e-4 * torch.linalg.vector_norm(g) + 1e-8, k


@pytest.fixture
def trained_adapter(trainer, make_adapter):
    """Nonzero B matrices everywhere, the output layer's LoRA included."""
    a = make_adapter(rank=8, seed=5, train_unembed=True, train_mlp=True)
    with torch.no_grad():
        for p in trainer.adapters[a].params.values():
            p.add_(torch.randn_like(p) * 0.05)
    return a


# 45 tokens: the long group (20 + 4 + ...) straddles micro-batches, the others fit whole
BUDGET = 45


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("loss_fn", list(REFERENCE_LOSSES))
def test_shared_prefixes_give_what_each_datum_alone_gives(trainer, trained_adapter, monkeypatch, loss_fn,
                                                          checkpointing):
    sequences = shared_prefix_sequences(trainer.policy.vocab_size)
    data = make_data(loss_fn, sequences, trainer.policy.vocab_size)
    expected = one_shot(trainer, trained_adapter, data, loss_fn)
    monkeypatch.setattr(trainer.policy, "microbatch_tokens", BUDGET)
    monkeypatch.setattr(trainer.policy, "logit_chunk_rows", 7)  # chunks end inside segments
    monkeypatch.setattr(trainer.policy, "gradient_checkpointing", checkpointing)
    groups = plan(sequences, BUDGET)
    assert 3 <= len(groups) < len(sequences)
    out = trainer.forward_backward(trained_adapter, data, loss_fn)
    assert_matches(out, take_grads(trainer, trained_adapter), expected)
    computed = sum(computed_tokens([sequences[i] for i in g]) for g in groups)
    assert out.metrics["tokens_computed:sum"] == computed
    assert out.metrics["tokens_unshared:sum"] == sum(len(s) for s in sequences)
    assert computed < 0.75 * out.metrics["tokens_unshared:sum"] < out.metrics["tokens_padded:sum"]


def test_sharing_off_computes_every_datum_and_gives_the_same(trainer, trained_adapter, monkeypatch):
    sequences = shared_prefix_sequences(trainer.policy.vocab_size)
    data = make_data("ppo", sequences, trainer.policy.vocab_size)
    expected = one_shot(trainer, trained_adapter, data, "ppo")
    monkeypatch.setattr(trainer.policy, "share_prefixes", False)
    out = trainer.forward_backward(trained_adapter, data, "ppo")
    assert_matches(out, take_grads(trainer, trained_adapter), expected)
    assert out.metrics["tokens_computed:sum"] == out.metrics["tokens_unshared:sum"] == sum(map(len, sequences))


def test_forward_shares_prefixes_without_gradients(trainer, trained_adapter, monkeypatch):
    sequences = shared_prefix_sequences(trainer.policy.vocab_size)
    data = make_data("cross_entropy", sequences, trainer.policy.vocab_size)
    _, expected_lps, _ = one_shot(trainer, trained_adapter, data, "cross_entropy")
    monkeypatch.setattr(trainer.policy, "microbatch_tokens", BUDGET)
    out = trainer.forward(trained_adapter, data, "cross_entropy")
    assert all(p.grad is None for p in trainer.adapters[trained_adapter].params.values())
    for o, lp in zip(out.loss_fn_outputs, expected_lps):
        assert torch.allclose(o["logprobs"], lp, atol=1e-5, rtol=0)
    assert out.metrics["tokens_computed:sum"] < out.metrics["tokens_unshared:sum"]


def test_packing_computes_each_shared_prefix_once():
    a, b = [1, 2, 3, 4], [9, 9]
    seqs = [a + [5, 6], b + [7], a + [8], a, b + [7], [4, 4, 4]]
    packed = pack(seqs, torch.device("cpu"))
    # a once (4), its branches [5, 6] and [8], b once with [7] (the two identical datums), [4, 4, 4]
    assert len(packed.tokens) == computed_tokens(seqs) == 4 + 2 + 1 + 3 + 3
    for seq, path in zip(seqs, packed.paths):
        assert [packed.tokens[r] for r in path] == seq
        assert [packed.positions[r] for r in path] == list(range(len(seq)))
    assert packed.paths[2][:4] == packed.paths[0][:4] == packed.paths[3]  # the same rows, not copies
    assert packed.paths[1] == packed.paths[4]
    unshared = pack(seqs, torch.device("cpu"), share=False)
    assert len(unshared.tokens) == sum(map(len, seqs))


def test_the_plan_keeps_groups_whole_and_cuts_where_little_is_shared():
    prompts = [[p] * 30 for p in range(1, 5)]
    seqs = [prompts[i % 4] + [100 + i] * (3 + i % 5) for i in range(32)]  # 4 groups of 8, interleaved
    groups = plan(seqs, 100)  # a group computes 30 + 8 x 3..7 tokens: one fits, two do not
    for g in groups:
        assert computed_tokens([seqs[i] for i in g]) <= 100
        assert len({seqs[i][0] for i in g}) == 1  # one prompt per micro-batch: every group fits whole
    assert sorted(i for g in groups for i in g) == list(range(32))
    runs = units(seqs, 4)
    assert len(runs) == 4 and all(len({seqs[i][0] for i in r}) == 1 for r in runs)


def test_the_stale_sampler_alarm(trainer, make_adapter, caplog):
    """Scoring samples with the weights that drew them measures no gap; training in between makes it appear,
    and colo warns naming the adapter."""
    a = make_adapter(rank=8, seed=2)
    prompt = trainer.tokenizer.encode("the stale sampler")
    [result] = trainer.sample(a, [prompt], 4, SamplingParams(max_tokens=12, temperature=1.0, seed=4))
    data = []
    for seq in result.sequences:
        tokens = prompt + seq.tokens
        n = len(tokens) - 1
        sampler = torch.zeros(n)
        sampler[len(prompt) - 1:] = torch.tensor(seq.logprobs)
        advantages = torch.zeros(n)
        advantages[len(prompt) - 1:] = 1.0
        data.append(Datum(tokens[:-1], {"target_tokens": torch.tensor(tokens[1:]), "logprobs": sampler,
                                        "advantages": advantages}))
    fresh = trainer.forward(a, data, "importance_sampling").metrics
    assert abs(fresh["kl_sample_train_v1:mean"]) < 1e-5 and fresh["sampler_gap_max:max"] < 1e-4
    plain = [Datum(d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in data]
    for _ in range(3):
        trainer.forward_backward(a, plain, "cross_entropy")
        trainer.optim_step(a, AdamParams(learning_rate=0.05))
    with caplog.at_level(logging.WARNING, logger="colo.trainer"):
        stale = trainer.forward(a, data, "importance_sampling").metrics
    assert stale["kl_sample_train_v2:mean"] > 100 * max(fresh["kl_sample_train_v2:mean"], 1e-9)
    assert stale["kl_sample_train_v2:mean"] > trainer.config.sampler_gap_warn
    assert any(a in r.getMessage() and "kl_sample_train_v2" in r.getMessage() for r in caplog.records)
    assert "kl_sample_train_v1:mean" not in trainer.forward(a, plain, "cross_entropy").metrics


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_is_each_sequences_own_attention(window, softcap):
    """The attention function alone, against softmax(q k^T) v of each sequence by itself (GQA: 4 query heads on
    2 KV heads), with a sliding window and soft-capping."""
    from colo.packed_attention import packed

    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9], [1, 2, 7, 7, 7], [5], [8, 8, 8, 8, 8, 8, 8]]
    p = pack(seqs, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    # one query/key/value per (position, token prefix): shared rows must give every sequence the same values
    table: dict[tuple, tuple] = {}
    for seq in seqs:
        for i in range(len(seq)):
            table.setdefault(tuple(seq[: i + 1]), tuple(torch.randn(h, 8, generator=g) for h in (4, 2, 2)))
    q, k, v = (torch.zeros(1, h, len(p.tokens), 8) for h in (4, 2, 2))
    for seq, path in zip(seqs, p.paths):
        for i, r in enumerate(path):
            q[0, :, r], k[0, :, r], v[0, :, r] = table[tuple(seq[: i + 1])]
    out = packed(q, k, v, p.attention, 0.5, window, softcap)[0]
    for seq, path in zip(seqs, p.paths):
        qs, ks, vs = (torch.stack([table[tuple(seq[: i + 1])][j] for i in range(len(seq))], 1) for j in range(3))
        ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
        scores = qs @ ks.transpose(-1, -2) * 0.5
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(len(seq))
        allowed = pos[None, :] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - pos[None, :] < window
        expected = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1)
        assert torch.allclose(out[path], expected, atol=1e-5), seq


def test_an_attention_call_holds_a_bounded_number_of_key_positions(monkeypatch):
    """Many samples after a long shared context are split over several calls, each under CALL_KEYS key rows."""
    from colo import packing

    monkeypatch.setattr(packing, "CALL_KEYS", 100)
    context = list(range(1, 31))
    seqs = [context + [100 + i] * 5 for i in range(12)]  # 12 x (30 + 5) = 420 key rows in one call
    p = pack(seqs, torch.device("cpu"))
    calls = [c for c in p.attention.chunks if c.valid.shape[0] > 1 or c.key_positions.shape[1] > 30]
    assert len(calls) == 6  # 2 samples per call (2 x 35 <= 100 < 3 x 35)
    for c in calls:
        assert c.key_positions.numel() <= 100
    assert sum(c.valid.sum() for c in p.attention.chunks) == len(p.tokens) == 30 + 60
