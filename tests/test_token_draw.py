"""engines.pytorch.token_draw: every row's token in one pass, with counter-based seeds.

The expected frequencies are worked out by hand from the distribution given, not by the code under test.
"""

import math

import pytest
import torch

from colo.types import SamplingParams
from engines.pytorch.token_draw import RowParams, draw, uniforms

ROWS = 20_000
PROBS = [0.5, 0.3, 0.15, 0.05]


def _raw(vocab: int) -> torch.Tensor:
    p = torch.zeros(vocab, dtype=torch.float64)
    p[: len(PROBS)] = torch.tensor(PROBS, dtype=torch.float64)
    p[7] = 0.0  # explicitly impossible
    return p.log().float().expand(ROWS, vocab)


def _draw(params: SamplingParams, vocab: int = 512, step: int = 0) -> torch.Tensor:
    rows = RowParams.of([params] * ROWS, list(range(ROWS)), [0] * ROWS, vocab, torch.device("cpu"))
    return draw(_raw(vocab), rows, torch.tensor(step))


def _assert_frequencies(tokens: torch.Tensor, expected: dict[int, float]) -> None:
    counts = torch.bincount(tokens, minlength=16).double() / ROWS
    for token, p in expected.items():
        sigma = math.sqrt(p * (1 - p) / ROWS)
        assert abs(counts[token].item() - p) < 5 * sigma + 1e-12, (token, counts[token].item(), p)
    assert set(tokens.unique().tolist()) <= set(t for t, p in expected.items() if p > 0)


@pytest.mark.parametrize("vocab", [512, 37], ids=["vocab divisible into blocks", "padded vocab"])
def test_draws_follow_the_distribution(vocab):
    _assert_frequencies(_draw(SamplingParams(), vocab), dict(enumerate(PROBS)))


def test_temperature_sharpens_the_distribution():
    squared = [p * p for p in PROBS]
    _assert_frequencies(_draw(SamplingParams(temperature=0.5)), {i: q / sum(squared) for i, q in enumerate(squared)})


def test_top_k_and_top_p_cut_the_tail():
    _assert_frequencies(_draw(SamplingParams(top_k=2)), {0: 0.5 / 0.8, 1: 0.3 / 0.8})
    # top-p keeps the tokens whose higher-ranked mass is below 0.7: the first two (0 and 0.5 above them)
    _assert_frequencies(_draw(SamplingParams(top_p=0.7)), {0: 0.5 / 0.8, 1: 0.3 / 0.8})
    _assert_frequencies(_draw(SamplingParams(top_k=3, top_p=0.99)), {0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95})


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    params = [SamplingParams(temperature=0), SamplingParams(seed=1)] * 4
    rows = RowParams.of(params, list(range(8)), [0] * 8, 512, torch.device("cpu"))
    raw = _raw(512)[:8].clone()
    raw[0, 3] = 0.0  # row 0's most likely token is 3
    tokens = draw(raw, rows, torch.tensor(0))
    assert tokens[0].item() == 3 and tokens[2::2].tolist() == [0, 0, 0]


def test_uniforms_depend_on_seed_sample_and_step_only():
    def u(seeds, samples, step):
        rows = RowParams.of([SamplingParams()] * len(seeds), seeds, samples, 8, torch.device("cpu"))
        return uniforms(rows, torch.tensor(step))

    first = u([5, 2**62 + 5, 5], [0, 0, 1], 3)
    again = u([9, 5, 2**62 + 5, 5], [0, 0, 0, 1], 3)[1:]  # same rows, another neighbour, another position
    assert torch.equal(first, again)
    assert len(set(first.tolist())) == 3  # the seed's high bits and the sample number both count
    assert not torch.equal(first, u([5, 2**62 + 5, 5], [0, 0, 1], 4))
    many = u(list(range(10_000)), [0] * 10_000, 0)
    assert 0 < many.min().item() and many.max().item() < 1
    assert abs(many.mean().item() - 0.5) < 0.01
