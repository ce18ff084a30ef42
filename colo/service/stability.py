"""Sequences recorded at sampling time for ``stable_reinforce`` (Tinker's ``record_stability_info``).

A sample request with ``record_stability_info=True`` has each of its sequences kept under its
``sequence_id``: the prompt, the sampled tokens and the sampler's logprobs of them. A training datum
then names where its tokens came from with provenance spans (``loss_fn_input_spans``), and the loss
uses the logprobs colo recorded, not ones the client sends (``use_recorded_logprobs``): the importance
weights rest on what the sampler really computed. A sequence is kept for a day after it was recorded or last used, as Tinker
keeps them, and the oldest go first beyond ``MAX_TOKENS`` tokens.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from colo.errors import InvalidRequestError
from colo.types import Datum

KEEP_SECONDS = 86_400.0
MAX_TOKENS = 1 << 24  # about 200 MB of recorded tokens and logprobs


@dataclass(frozen=True)
class Span:
    """Positions ``[offset, offset + length)`` of a sequence's prompt (``kind="prompt"``) or sampled tokens."""

    kind: str
    sequence_id: str
    offset: int
    length: int


@dataclass
class _Recorded:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    used: float
    adapter: str | None  # the adapter and version that sampled it
    version: int | None


class StabilityRecords:
    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str], _Recorded] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def record(self, tenant: str, sequence_id: str, prompt: list[int], tokens: list[int], logprobs: list[float],
               adapter: str | None = None, version: int | None = None) -> None:
        with self._lock:
            self._items[(tenant, sequence_id)] = _Recorded(list(prompt), list(tokens), list(logprobs), time.monotonic(),
                                                           adapter, version)
            self._tokens += len(prompt) + len(tokens)
            self._expire()

    def use_recorded_logprobs(self, tenant: str, data: list[Datum], spans: list[list[Span]]) -> set[tuple[str | None, int | None]]:
        """For ``stable_reinforce``: each datum's ``logprobs`` input becomes the recorded sampler logprobs. Returns
        the adapter versions that sampled the sequences used."""
        sources: set[tuple[str | None, int | None]] = set()
        for i, (d, datum_spans) in enumerate(zip(data, spans)):
            if not datum_spans:
                raise InvalidRequestError(
                    f"data[{i}] has no loss_fn_input_spans; stable_reinforce trains on sequences recorded at "
                    "sampling time: allowed: datums with provenance spans (Datum.with_provenance) naming "
                    "sequences sampled with record_stability_info=True")
            targets = d.loss_fn_inputs.get("target_tokens")
            advantages = d.loss_fn_inputs.get("advantages")
            if targets is None or advantages is None:
                break  # the Trainer's own checks say what is missing
            d.loss_fn_inputs["logprobs"] = self.sampler_logprobs(tenant, i, targets.tolist(), advantages, datum_spans,
                                                                 sources)
        return sources

    def sampler_logprobs(self, tenant: str, index: int, targets: list[int], advantages: torch.Tensor,
                         spans: list[Span], sources: set[tuple[str | None, int | None]]) -> torch.Tensor:
        """The recorded sampler logprob of each target of datum ``index`` (0 on prompt positions), checked
        against the spans: they must tile the targets, name recorded sequences of this tenant, and match
        their tokens; prompt positions may not carry an advantage. Adds to ``sources`` the adapter versions
        that sampled the sampled spans."""
        where = f"data[{index}]"
        if sum(s.length for s in spans) != len(targets):
            raise InvalidRequestError(f"{where}: loss_fn_input_spans cover {sum(s.length for s in spans)} positions, "
                                      f"target_tokens has {len(targets)}; allowed: spans that tile the targets")
        out = torch.zeros(len(targets))
        pos = 0
        with self._lock:
            for span in spans:
                rec = self._items.get((tenant, span.sequence_id))
                if rec is None:
                    raise InvalidRequestError(
                        f"{where}: sequence {span.sequence_id!r} was not recorded, or has expired; allowed: a "
                        "sequence_id from a sampling client made with record_stability_info=True, within a day")
                rec.used = time.monotonic()
                self._items.move_to_end((tenant, span.sequence_id))
                source = rec.prompt if span.kind == "prompt" else rec.tokens
                end = span.offset + span.length
                if span.offset < 0 or span.length < 0 or end > len(source):
                    raise InvalidRequestError(f"{where}: span [{span.offset}, {end}) of sequence {span.sequence_id!r}'s "
                                              f"{span.kind} tokens; allowed: within its {len(source)} tokens")
                if targets[pos: pos + span.length] != source[span.offset: end]:
                    raise InvalidRequestError(f"{where}: target_tokens[{pos}:{pos + span.length}] differ from sequence "
                                              f"{span.sequence_id!r}'s {span.kind} tokens [{span.offset}:{end}]")
                if span.kind == "sampled":
                    out[pos: pos + span.length] = torch.tensor(rec.logprobs[span.offset: end])
                    sources.add((rec.adapter, rec.version))
                elif bool(advantages[pos: pos + span.length].any()):
                    raise InvalidRequestError(f"{where}: advantages on prompt positions {pos}..{pos + span.length - 1}; "
                                              "allowed: nonzero advantages on sampled tokens only")
                pos += span.length
        return out

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if self._tokens <= MAX_TOKENS and now - oldest.used <= KEEP_SECONDS:
                break
            del self._items[key]
            self._tokens -= len(oldest.prompt) + len(oldest.tokens)
