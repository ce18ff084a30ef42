"""Batched autoregressive sampling on a Hugging Face causal LM, built so the device never waits on the host.

- The KV cache is preallocated (transformers' ``StaticCache``) for the prompt width plus the most new
  tokens any row may take, and every decode step has the same shapes: the attention mask covers the
  whole cache from the start and a column is switched on as it is written.
- Each step draws every row's token in one pass (``engines.pytorch.token_draw``), writes tokens and logprobs
  into preallocated device tensors and decides on the device which rows have finished (a stop token or
  their length). The host looks every ``SYNC_EVERY`` steps: to end the loop when all rows are done and
  to search stop strings, which need the tokenizer. Rows that finish keep decoding until then (their
  tokens are cut off), which keeps the batch rectangular.

Each row is one sample of one request; a request's rows share its seed and are told apart by their
sample number, so a seeded request draws the same tokens whatever else is in the batch. The logprob
reported for a token is from the raw distribution (temperature 1, no top-k/top-p), which is what the
trainer computes; the token itself is drawn from the processed distribution.

Rows with the same prompt and adapter (a request's samples, above all) share one prefill: only the
distinct prompts are run, and their KV cache rows and last logits are copied to every row of that
prompt before the first draw; the decode steps then run on every row, as if each had been prefilled.
"""

from __future__ import annotations

import secrets
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from colo.types import SampledSequence, SamplingParams
from engines.pytorch.token_draw import RowParams, draw

# Host look-ups per decode step cost a device round trip each; every 8 steps the waste is at most 7
# steps of rows that already finished.
SYNC_EVERY = 8


@dataclass
class Row:
    prompt: list[int]
    params: SamplingParams
    seed: int  # the request's seed (drawn at random when it has none), shared by its rows
    sample: int  # which of the request's samples this row is
    max_new: int  # max_tokens, cut to what the context leaves
    adapter: str | None = None  # the adapter it samples from (None: the base model); rows share a prefill
    # only when their prompts and adapters are the same
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def request_seed(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else secrets.randbits(62)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    rows: list[Row],
    pad_token_id: int,
    eos_token_ids: frozenset[int],
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    vocab_size: int,
    decode: Callable[..., Any] | None = None,
    cache_len: int | None = None,
    share_prefill: bool = True,
    select_rows: Callable[[list[int]], AbstractContextManager[Any]] | None = None,
) -> tuple[int, int]:
    """Fill each row's tokens, logprobs and stop_reason. ``decode`` runs the decode steps (default: ``model``;
    the compiled step); ``cache_len`` sizes the KV cache (default: just enough). ``share_prefill``: rows of
    one prompt and adapter share its prefill; inside ``select_rows(index)``, a forward pass of ``len(index)``
    rows is rows ``index`` of the batch (the engine's per-row adapters). Returns the prompt tokens
    prefilled and those of all rows (what prefilling every row would have taken)."""
    batch = len(rows)
    width = max(len(r.prompt) for r in rows)
    steps = max(r.max_new for r in rows)
    cache_len = max(cache_len or 0, width + steps)
    decode = decode or model
    mask = torch.zeros((batch, cache_len), dtype=torch.long)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding: every row's next token is at the same column
        ids[b, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[b, width - len(r.prompt): width] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)

    draw_params = RowParams.of([r.params for r in rows], [r.seed for r in rows], [r.sample for r in rows],
                               vocab_size, device)
    stop_ids = _stop_ids(rows, eos_token_ids, device)
    max_new = torch.tensor([r.max_new for r in rows], device=device)
    tokens = torch.zeros((batch, steps), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, steps), dtype=torch.float32, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    done = max_new <= 0
    step = torch.zeros((), dtype=torch.long, device=device)
    string_rows = [b for b, r in enumerate(rows) if r.params.stop_strings]

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    # only attention layers' keys and values are copied: a model with other cache state prefills every row
    share = share_prefill and all(type(layer) in (StaticLayer, StaticSlidingWindowLayer) for layer in cache.layers)
    firsts: dict[Any, int] = {}  # a prompt and adapter (or, unshared, a row) -> its row of the prefill batch
    spread = [firsts.setdefault((tuple(r.prompt), r.adapter) if share else b, len(firsts))
              for b, r in enumerate(rows)]
    prefilled = [spread.index(k) for k in range(len(firsts))]  # the first row of each distinct prompt
    shared = len(prefilled) < batch
    pick = prefilled if shared else slice(None)
    with select_rows(prefilled) if shared and select_rows else nullcontext():
        out = model(input_ids=ids[pick], attention_mask=mask[pick], position_ids=positions[pick],
                    past_key_values=cache, cache_position=torch.arange(width, device=device), use_cache=True,
                    # an index tensor, not 1: a slice would reach the output layer as a strided view, which
                    # torch.matmul multiplies by copying the whole weight once per row
                    logits_to_keep=torch.tensor([width - 1], device=device))
    logits = out.logits[:, -1, :]
    if shared:
        index = torch.tensor(spread, device=device)
        logits = logits.index_select(0, index)
        _spread(cache, index)
    position = positions[:, -1:]
    column = torch.tensor([width], device=device)  # the cache column each decode step writes, kept on the device
    checked = 0  # steps whose tokens the host has searched for stop strings
    for t in range(steps):
        raw = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        chosen = draw(raw, draw_params, step)
        live = ~done
        tokens[:, t] = chosen
        logprobs[:, t] = raw.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        lengths += live
        hit = live & (chosen.unsqueeze(-1) == stop_ids).any(-1)
        stopped |= hit
        done = done | hit | (lengths >= max_new)
        step += 1
        if (t + 1) % SYNC_EVERY == 0 or t + 1 == steps:
            if string_rows:
                checked = _stop_strings(rows, string_rows, tokens, lengths, stopped, checked, t + 1, tokenizer)
                done = done | stopped
            if bool(done.all()):
                break
        mask[:, width + t] = 1
        position = position + 1
        out = decode(input_ids=chosen.unsqueeze(-1), attention_mask=mask, position_ids=position,
                     past_key_values=cache, cache_position=column, use_cache=True)
        logits = out.logits[:, -1, :]
        column = column + 1  # a new tensor: a compiled step may hold on to the one it was given

    tokens, logprobs, lengths, stopped = tokens.tolist(), logprobs.tolist(), lengths.tolist(), stopped.tolist()
    for b, r in enumerate(rows):
        r.tokens, r.logprobs = tokens[b][: lengths[b]], logprobs[b][: lengths[b]]
        r.stop_reason = "stop" if stopped[b] else "length"
    return sum(len(rows[b].prompt) for b in prefilled), sum(len(r.prompt) for r in rows)


def _spread(cache: StaticCache, index: torch.Tensor) -> None:
    """Row b of every layer's keys and values becomes the prefilled row ``index[b]`` (a copy), so the cache
    holds one row per row of the batch. The lengths written so far are the same for every row."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            layer.batch_size = len(index)
            # as the layer's own allocation does: compiled (CUDA-graph) decode steps read them in place
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def _stop_ids(rows: list[Row], eos_token_ids: frozenset[int], device: torch.device) -> torch.Tensor:
    """(rows, S): each row's stop token ids (end of sequence and its request's), padded with -1."""
    per_row = [sorted(eos_token_ids | set(r.params.stop_token_ids)) for r in rows]
    width = max(1, max(len(ids) for ids in per_row))
    return torch.tensor([ids + [-1] * (width - len(ids)) for ids in per_row], dtype=torch.long, device=device)


def _stop_strings(rows: list[Row], string_rows: list[int], tokens: torch.Tensor, lengths: torch.Tensor,
                  stopped: torch.Tensor, checked: int, upto: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """Search the tokens of steps [checked, upto) for stop strings; a row that holds one ends at the token
    that completes it (``lengths`` and ``stopped`` are updated on the device). Returns ``upto``."""
    seen, count = tokens[string_rows, :upto].tolist(), lengths[string_rows].tolist()
    for b, row_tokens, n in zip(string_rows, seen, count):
        strings = rows[b].params.stop_strings
        longest = max(len(s) for s in strings)
        for end in range(checked + 1, n + 1):
            # decode only a tail long enough to hold the longest stop string and the newest token
            text = tokenizer.decode(row_tokens[max(0, end - longest - 1): end], skip_special_tokens=False)
            if any(s in text for s in strings):
                lengths[b] = end
                stopped[b] = True
                break
    return upto


def to_sequence(row: Row) -> SampledSequence:
    return SampledSequence(tokens=row.tokens, logprobs=row.logprobs, stop_reason=row.stop_reason or "length")
