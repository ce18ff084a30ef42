"""Batched autoregressive sampling with a KV cache, on a Hugging Face causal LM.

Each row is one sample of one request. Rows of a request share a ``torch.Generator`` seeded from the
request, so a seeded request draws the same tokens whatever else is in the batch. The logprob
reported for a token is from the raw distribution (temperature 1, no top-k/top-p), which is what
the trainer computes; the token itself is drawn from the processed distribution.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from colo.types import SampledSequence, SamplingParams


@dataclass
class Row:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_new: int  # max_tokens, cut to what the context leaves
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    return torch.Generator(device=device).manual_seed(seed)


def pick_tokens(raw_logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row of ``raw_logprobs`` (R, V) under ``params``."""
    if params.temperature == 0:
        return raw_logprobs.argmax(dim=-1)
    logits = raw_logprobs / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    rows: list[Row],
    groups: list[list[int]],  # row indices of each request (they share params and generator)
    pad_token_id: int,
    eos_token_ids: frozenset[int],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> None:
    """Fill each row's tokens, logprobs and stop_reason."""
    batch = len(rows)
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, r in enumerate(rows):  # left padding: every row's next token is at the last column
        ids[b, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[b, width - len(r.prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    last_pos = positions[:, -1:]

    live = set(range(batch))
    for _ in range(max(r.max_new for r in rows)):
        raw = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        chosen = torch.empty(batch, dtype=torch.long, device=device)
        for members in groups:
            index = torch.tensor(members, device=device)
            chosen[index] = pick_tokens(raw[index], rows[members[0]].params, rows[members[0]].generator)
        chosen_lp = raw.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
        chosen_list = chosen.tolist()
        for b in list(live):
            r = rows[b]
            token = chosen_list[b]
            r.tokens.append(token)
            r.logprobs.append(chosen_lp[b])
            if token in eos_token_ids or token in r.params.stop_token_ids or _hits_stop_string(r, tokenizer):
                r.stop_reason = "stop"
            elif len(r.tokens) >= r.max_new:
                r.stop_reason = "length"
            if r.stop_reason is not None:
                live.discard(b)
        if not live:
            break
        # finished rows keep decoding (their tokens are dropped): it keeps the batch rectangular
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=chosen.unsqueeze(-1), attention_mask=mask, position_ids=last_pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values


def _hits_stop_string(row: Row, tokenizer: PreTrainedTokenizerBase) -> bool:
    if not row.params.stop_strings:
        return False
    # decode only a tail long enough to hold the longest stop string and the newest token
    tail = row.tokens[-(max(len(s) for s in row.params.stop_strings) + 1):]
    text = tokenizer.decode(tail, skip_special_tokens=False)
    return any(s in text for s in row.params.stop_strings)


def to_sequence(row: Row) -> SampledSequence:
    return SampledSequence(tokens=row.tokens, logprobs=row.logprobs, stop_reason=row.stop_reason or "length")
