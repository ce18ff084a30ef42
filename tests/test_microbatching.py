"""forward_backward in micro-batches, with logprobs computed in chunks from the hidden states, gives
what one full forward over the whole batch gives; and its memory follows the micro-batch."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from colo import Datum
from colo.packing import plan
from helpers import REFERENCE_LOSSES, one_shot, take_grads

LENGTHS = [5, 17, 9, 30, 12, 3, 17]
BUDGET = 40  # packed without padding, 93 tokens in 4 micro-batches: boundaries inside the batch
CHUNK_ROWS = 7  # several logit chunks per micro-batch, one ending inside a sequence

def make_data(loss_fn: str, vocab: int) -> list[Datum]:
    g = torch.Generator().manual_seed(7)
    data = []
    for n in LENGTHS:
        tokens = torch.randint(3, vocab, (n + 1,), generator=g)
        inputs = {"target_tokens": tokens[1:]}
        if loss_fn == "cross_entropy":
            inputs["weights"] = torch.rand(n, generator=g)
        else:
            inputs["logprobs"] = -torch.rand(n, generator=g) * 6
            inputs["advantages"] = torch.randn(n, generator=g)
        data.append(Datum(tokens[:-1].tolist(), inputs))
    return data


@pytest.fixture
def trained_adapter(trainer, make_adapter):
    """An adapter with non-zero B matrices (a fresh LoRA's B is zero, which would hide half the gradient)."""
    a = make_adapter(rank=8, seed=11, train_unembed=True)
    with torch.no_grad():
        for p in trainer.adapters[a].params.values():
            p.add_(torch.randn_like(p) * 0.05)
    return a


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("loss_fn", list(REFERENCE_LOSSES))
def test_micro_batched_chunked_forward_backward_equals_one_shot(trainer, trained_adapter, monkeypatch, loss_fn,
                                                                checkpointing):
    data = make_data(loss_fn, trainer.policy.vocab_size)
    expected_loss, expected_lps, expected_grads = one_shot(trainer, trained_adapter, data, loss_fn)

    monkeypatch.setattr(trainer.policy, "microbatch_tokens", BUDGET)
    monkeypatch.setattr(trainer.policy, "logit_chunk_rows", CHUNK_ROWS)
    monkeypatch.setattr(trainer.policy, "gradient_checkpointing", checkpointing)
    with trainer.policy.active(trained_adapter) as model:
        layer = model.get_base_model().get_decoder().layers[0]
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = trainer.forward_backward(trained_adapter, data, loss_fn)
    finally:
        hook.remove()
    grads = take_grads(trainer, trained_adapter)

    micro_batches = len(plan([d.model_input for d in data], BUDGET))
    assert micro_batches == 3
    # with checkpointing each layer starts again in backward (recompute stops early, so pre-hooks count it)
    assert len(calls) == micro_batches * (2 if checkpointing else 1)
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-5)
    for o, lp in zip(out.loss_fn_outputs, expected_lps):
        assert o["logprobs"].shape == lp.shape
        assert torch.allclose(o["logprobs"], lp, atol=1e-5, rtol=0)
    for k, g in expected_grads.items():
        assert torch.linalg.vector_norm(grads[k] - g) <= 1e-4 * torch.linalg.vector_norm(g) + 1e-8, k
    assert any(".lm_head." in k for k in grads)  # the unembedding LoRA gets its gradient through the chunks


def test_forward_without_gradients_gives_the_same_logprobs(trainer, trained_adapter, monkeypatch):
    data = make_data("cross_entropy", trainer.policy.vocab_size)
    _, expected_lps, _ = one_shot(trainer, trained_adapter, data, "cross_entropy")
    monkeypatch.setattr(trainer.policy, "microbatch_tokens", BUDGET)
    monkeypatch.setattr(trainer.policy, "logit_chunk_rows", CHUNK_ROWS)
    out = trainer.forward(trained_adapter, data, "cross_entropy")
    assert all(p.grad is None for p in trainer.adapters[trained_adapter].params.values())
    for o, lp in zip(out.loss_fn_outputs, expected_lps):
        assert torch.allclose(o["logprobs"], lp, atol=1e-5, rtol=0)


def test_plan_keeps_every_micro_batch_under_the_budget():
    lengths = [5, 17, 9, 30, 12, 3, 17, 64, 1, 1, 2]
    sequences = [[100 + i] * n for i, n in enumerate(lengths)]  # nothing shared
    groups = plan(sequences, 40)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert sum(lengths[i] for i in g) <= 40 or len(g) == 1
    assert [7] in groups  # longer than the budget: alone
    assert len(groups) == 5  # 161 tokens, 64 of them alone: 97 in three of 40 at best
    assert plan([[1] * 3, [2] * 3, [3] * 3], 1000) == [[0, 1, 2]]


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from tiny_model import build_tiny_model
    from colo import Datum, Trainer

    torch.set_num_threads(1)
    model = build_tiny_model(__import__("pathlib").Path(sys.argv[2]), vocab_size=16384)
    LENGTH, FEW, MANY = 120, 8, 64
    t = Trainer(model=str(model), dtype="float32", engine="pytorch", device="cpu", microbatch_tokens=FEW * LENGTH)
    a = t.create_lora(rank=8, seed=0)
    g = torch.Generator().manual_seed(0)
    # each datum starts with a token of its own: micro-batches of one shape, as 8 datums alone are (shapes that
    # differ by a shared token cost the allocator one more 63 MB logit chunk at the peak, once, measured)
    data = [Datum.from_sequence([3 + i] + torch.randint(3, 500, (LENGTH,), generator=g).tolist())
            for i in range(MANY)]
    # VmHWM, not ru_maxrss: ru_maxrss carries over the parent's peak across exec
    peak = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    t.forward(a, data[:1])  # first-call allocations
    base = peak()
    t.forward_backward(a, data[:FEW])
    few = peak()
    t.forward_backward(a, data)
    many = peak()
    print(json.dumps({"base": base, "few": few, "many": many, "vocab": t.policy.vocab_size}))
""")


def test_peak_memory_does_not_grow_with_the_number_of_datums(tmp_path):
    """64 datums under a budget of 8 datums' tokens peak no higher than 8 datums do (1.25x allowed).

    The model's vocabulary is large (16,384) so that full logits would dominate: 64 x 120 positions of
    float32 logits are 503 MB, and a one-shot forward_backward keeps several tensors of that size."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path / "model")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["vocab"] == 16384
    few, many = m["few"] - m["base"], m["many"] - m["base"]
    assert few > 20e6, m  # the measurement sees the logits of 8 datums at all
    assert many <= 1.25 * few, m
