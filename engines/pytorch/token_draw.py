"""The next token of every row of a decode batch, drawn in one pass of tensor operations.

Each row has its own temperature, top-k, top-p and seed, held as tensors on the device, so a step
costs the same few operations whatever the mix of requests, and nothing waits on the host.

Randomness is counter-based: the uniform number behind row r's token at step t is a hash of
(the request's seed, r's sample number within its request, t), and the token is found by inverse-CDF
search with it. So a seeded request draws the same tokens whatever else is in the batch, in whatever
order, on any device (given the same probabilities), and no ``torch.Generator`` per request is needed
(one generator per request would mean one sampling call per request per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colo.types import SamplingParams

_MASK32 = 0xFFFFFFFF
_BLOCKS = (256, 128, 64, 32)  # tokens per block of the inverse-CDF search: the first that divides the vocabulary


@dataclass
class RowParams:
    temperature: torch.Tensor  # (B, 1) float32; greedy rows hold 1 (their draw is replaced by the argmax)
    greedy: torch.Tensor  # (B,) bool
    top_k: torch.Tensor  # (B, 1) long; the vocabulary size where there is no top-k
    top_p: torch.Tensor  # (B, 1) float32
    seed_lo: torch.Tensor  # (B,) long, the seed's low 32 bits
    seed_hi: torch.Tensor  # (B,) long, the seed's high bits
    sample: torch.Tensor  # (B,) long, the row's sample number within its request
    filtered: bool  # some row has top-k or top-p: the one sort per step is needed
    row_filtered: torch.Tensor  # (B, 1) bool: the row has top-k or top-p
    any_greedy: bool
    unit_temperature: bool  # every row samples at temperature 1 or is greedy

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int], samples: list[int], vocab: int,
           device: torch.device) -> RowParams:
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        filtered = [k < vocab or p.top_p < 1.0 for k, p in zip(top_k, params)]
        return cls(
            temperature=column([p.temperature or 1.0 for p in params], torch.float32).unsqueeze(-1),
            greedy=column([p.temperature == 0 for p in params], torch.bool),
            top_k=column(top_k, torch.long).unsqueeze(-1),
            top_p=column([p.top_p for p in params], torch.float32).unsqueeze(-1),
            seed_lo=column([s & _MASK32 for s in seeds], torch.long),
            seed_hi=column([s >> 32 for s in seeds], torch.long),
            sample=column(samples, torch.long),
            filtered=any(filtered),
            row_filtered=column(filtered, torch.bool).unsqueeze(-1),
            any_greedy=any(p.temperature == 0 for p in params),
            unit_temperature=all(p.temperature in (0, 1) for p in params),
        )


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" finaliser); the multipliers are below 2**31 so every product
    of a 32-bit value fits in int64 without overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniforms(rows: RowParams, step: torch.Tensor) -> torch.Tensor:
    """One float64 number in (0, 1) per row, a function of (seed, sample number, step) only."""
    h = _mix((step + 0x9E3779B9) & _MASK32)
    h = _mix(h ^ rows.sample)
    h = _mix(h ^ rows.seed_hi)
    h = _mix(h ^ rows.seed_lo)
    return (h.double() + 0.5) / 2.0**32


def draw(raw_logprobs: torch.Tensor, rows: RowParams, step: torch.Tensor) -> torch.Tensor:
    """One token per row of ``raw_logprobs`` (B, V): greedy rows take the argmax, the others a draw from
    the distribution at their temperature, cut to their top-k and then their top-p.

    Every operation is row by row and the search runs in vocabulary order, so a row's token is the
    same whether or not its neighbours needed the sort that top-k and top-p take.
    """
    # unnormalised: the search scales its target by each row's total, so no softmax is needed
    mass = raw_logprobs - raw_logprobs.amax(dim=-1, keepdim=True)  # in place from here: one (B, V) buffer
    if not rows.unit_temperature:
        mass.div_(rows.temperature)  # (dividing by 1 would change nothing: skipping it keeps rows comparable)
    mass.exp_()
    if rows.filtered:
        ranked, order = torch.sort(mass, dim=-1, descending=True)
        rank = torch.arange(mass.shape[-1], device=mass.device)
        ranked = ranked.masked_fill(rank >= rows.top_k, 0.0)
        before = torch.cumsum(ranked, dim=-1) - ranked  # the mass of the tokens ranked above each one
        drop = (rank >= rows.top_k) | (before >= rows.top_p * ranked.sum(-1, keepdim=True))
        drop &= rows.row_filtered
        mass = mass.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), 0.0)
    tokens = _inverse_cdf(mass, uniforms(rows, step))
    if not rows.any_greedy:
        return tokens
    return torch.where(rows.greedy, raw_logprobs.argmax(dim=-1), tokens)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index where each row's cumulative (unnormalised) mass first exceeds ``u`` times its total.

    A cumulative sum over the whole vocabulary is a slow sequential scan on CPU; instead the mass of
    blocks of a few hundred tokens is summed, the block is found, and only that block is scanned, in float64
    so that the search matches the mass it was given. ``u`` < 1 - 2**-33 keeps the target strictly below
    the total: a zero-probability token is never chosen.
    """
    batch, vocab = probs.shape
    size = next((b for b in _BLOCKS if vocab % b == 0), None)
    if size is None:  # a vocabulary with no such factor: pad (a copy, the one case that needs it)
        size = _BLOCKS[0]
        probs = torch.nn.functional.pad(probs, (0, (-vocab) % size))
    blocks = probs.view(batch, -1, size)
    mass = blocks.sum(-1).double()  # (B, blocks); float32 sums: the clamp below absorbs their rounding
    upto = mass.cumsum(-1)
    target = u.unsqueeze(-1) * upto[:, -1:]
    block = torch.searchsorted(upto, target, right=True).clamp_(max=upto.shape[-1] - 1)  # (B, 1)
    inside = target - (upto.gather(-1, block) - mass.gather(-1, block))  # the mass left inside that block
    within = blocks.gather(1, block.unsqueeze(-1).expand(batch, 1, size)).squeeze(1).cumsum(-1, dtype=torch.float64)
    # rounding can leave ``inside`` a hair outside [0, the block's own sum): stay on a token with mass
    inside = torch.minimum(inside.clamp_(min=0.0), within[:, -1:] * (1 - 2.0**-40))
    offset = torch.searchsorted(within, inside, right=True).clamp_(max=size - 1)
    return (block * size + offset).squeeze(-1)
