"""Micro-batches packed into one row, each shared token prefix computed once.

In RL every sample of a question repeats its prompt; in multi-turn RL consecutive datums repeat the
conversation so far; in SFT datums repeat a system prompt. Datums are sorted by their tokens, so datums
that share a prefix are neighbours and the longest prefix a datum shares with any datum before it is the
one it shares with the datum just before it (``lcp``). A micro-batch is a run of sorted datums; its
tokens form a tree of *segments*: a segment is a stretch of tokens of one or more datums, its parent is
the segment its first token follows. Each segment is computed once, in one packed row with no padding;
a segment's tokens attend to their ancestors' tokens and causally to their own (``colo.packed_attention``).
A datum's logprobs come from the rows of its path from the root, so a shared prefix's hidden states
serve every datum under it and, in backward, receive the sum of their gradients. The result is exact:
each token sees the same keys and values, at the same positions, as in a forward of its datum alone.

With sharing off every datum is a segment of its own (still packed: no padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

# padded query area a batched attention call may take, relative to the real one (colo.packed_attention
# pads the segments of one parent into one call)
PAD_SLACK = 1.25
# most key positions one attention call holds: the call copies its context's keys and values once per segment
# (SDPA takes one batch), so 64 samples after a 4,000-token conversation would otherwise hold 256,000 key rows
# per layer; at this bound, K and V of one call take 64 MiB for 8 KV heads of 128 in bf16
CALL_KEYS = 1 << 14


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def sorted_order(sequences: Sequence[Sequence[int]], share: bool) -> tuple[list[int], list[int]]:
    """Indices of ``sequences`` in token order and each one's shared prefix with the one before it (0 for the
    first, and for all when ``share`` is off)."""
    order = sorted(range(len(sequences)), key=lambda i: (list(sequences[i]), i)) if share else list(range(len(sequences)))
    shared = [0] + [lcp(sequences[a], sequences[b]) if share else 0 for a, b in zip(order, order[1:])]
    return order, shared


def plan(sequences: Sequence[Sequence[int]], budget: int, share: bool = True) -> list[list[int]]:
    """Indices of ``sequences`` grouped into micro-batches of at most ``budget`` computed tokens (shared
    prefixes counted once within a micro-batch); a sequence longer than the budget is one of its own.

    Among all ways to cut the token-sorted order into runs under the budget, the one computing the fewest
    tokens is taken (then the fewest micro-batches): cuts fall where neighbours share little, so a group
    of samples of one prompt stays in one micro-batch whenever it fits. The largest micro-batch comes first,
    so running out of memory happens at once, not minutes in.
    """
    if budget < 1:
        raise ValueError(f"token budget {budget}; allowed: >= 1")
    order, shared = sorted_order(sequences, share)
    n = len(order)
    lengths = [len(sequences[i]) for i in order]
    # best[j]: (computed tokens, micro-batches) of the best cut of the first j sorted sequences
    best: list[tuple[int, int]] = [(0, 0)] + [(1 << 62, 0)] * n
    cut = [0] * (n + 1)
    for i in range(n):
        cost = 0
        for j in range(i + 1, n + 1):
            cost += lengths[j - 1] - (shared[j - 1] if j - 1 > i else 0)
            if cost > budget and j - 1 > i:
                break
            candidate = (best[i][0] + cost, best[i][1] + 1)
            if candidate < best[j]:
                best[j], cut[j] = candidate, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]: j])
        j = cut[j]
    groups.reverse()
    costs = [computed_tokens([sequences[i] for i in g], share) for g in groups]
    return [g for _, g in sorted(zip(costs, groups), key=lambda cg: -cg[0])]


def units(sequences: Sequence[Sequence[int]], at_least: int, share: bool = True) -> list[list[int]]:
    """Indices of ``sequences`` in runs of the token order to hand out whole (to ranks): cut where neighbours
    share fewer than a threshold of tokens, the lowest threshold that gives ``at_least`` runs (where the data
    has that many sequences), so that what the cuts lose is the least sharing."""
    order, shared = sorted_order(sequences, share)
    for threshold in [0] + [t + 1 for t in sorted(set(shared[1:]))]:  # the last cuts everywhere
        if 1 + sum(s < threshold for s in shared[1:]) >= min(at_least, len(order)):
            break
    runs: list[list[int]] = []
    for i, s in zip(order, shared):
        if not runs or s < threshold:
            runs.append([])
        runs[-1].append(i)
    return runs


def computed_tokens(sequences: Sequence[Sequence[int]], share: bool = True) -> int:
    """Tokens a micro-batch of these sequences computes: each shared prefix once."""
    order, shared = sorted_order(sequences, share)
    return sum(len(sequences[i]) for i in order) - sum(shared)


def padded_tokens(lengths: Sequence[int], budget: int) -> int:
    """Tokens the same data costs right-padded, unshared: micro-batches of ``rows x longest <= budget``,
    longest first (what colo computed before packing; reported beside what it computes now)."""
    total, rows, longest = 0, 0, 0
    for n in sorted(lengths, reverse=True):
        if rows and (rows + 1) * longest > budget:
            total += rows * longest
            rows = 0
        if rows == 0:
            longest = n
        rows += 1
    return total + rows * longest


@dataclass(eq=False)
class _Segment:
    start: int  # position of its first token in its sequences
    end: int
    row: int  # index of its first token in the packed row
    parent: _Segment | None
    children: list[_Segment] = field(default_factory=list)

    def split(self, at: int) -> _Segment:
        """Cut at position ``at``: this keeps ``[start, at)``, the returned child takes ``[at, end)`` and the children."""
        tail = _Segment(at, self.end, self.row + at - self.start, self, self.children)
        for child in tail.children:
            child.parent = tail
        self.end, self.children = at, [tail]
        return tail


@dataclass(frozen=True)
class AttentionChunk:
    """Segments of one parent attended to in one call: their queries padded to ``(n, width)``. The packed row
    is laid out chunk after chunk, so a chunk's real queries are rows ``start`` onwards, in order."""
    start: int
    context: torch.Tensor | slice  # (a,) packed rows of the ancestors, in position order (a slice if contiguous)
    rows: torch.Tensor | None  # (n, width) packed rows of each segment's tokens (padding: row 0); None: none
    # padded, the rows ``start`` to ``start + n * width``
    valid: torch.Tensor  # (n, width) bool
    query_positions: torch.Tensor  # (n, width) positions of the queries in their sequences
    key_positions: torch.Tensor  # (n, a + width)
    key_valid: torch.Tensor  # (n, a + width) bool

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """(n, 1, width, a + width) bool: causal over the context and the segment, within the window."""
        q = self.query_positions[:, :, None]
        k = self.key_positions[:, None, :]
        allowed = (k <= q) & self.key_valid[:, None, :]
        if sliding_window is not None:
            allowed &= q - k < sliding_window
        # padded queries attend to the first key only, so their (discarded) rows hold no NaN
        first = torch.zeros_like(allowed)
        first[:, :, 0] = True
        allowed = torch.where(self.valid[:, :, None], allowed, first)
        return allowed.unsqueeze(1)


@dataclass(frozen=True)
class PackedAttention:
    """What ``colo.packed_attention`` needs for one packed row (passed to the model as ``colo_packing``): the
    chunks' outputs, concatenated, are the packed row's."""
    chunks: tuple[AttentionChunk, ...]


@dataclass(frozen=True)
class Packed:
    tokens: list[int]
    positions: list[int]
    paths: list[list[int]]  # per sequence (input order): the packed rows of its tokens, in position order
    attention: PackedAttention


def pack(sequences: Sequence[Sequence[int]], device: torch.device, share: bool = True) -> Packed:
    """One packed row for one micro-batch of ``sequences`` (each at least one token long)."""
    order, shared = sorted_order(sequences, share)
    tokens: list[int] = []
    positions: list[int] = []
    roots: list[_Segment] = []
    ends: list[_Segment | None] = [None] * len(sequences)
    path: list[_Segment] = []  # the previous sequence's segments, root first
    for i, common in zip(order, shared):
        seq = sequences[i]
        while path and path[-1].start >= common:
            path.pop()
        if path and path[-1].end > common:
            top = path[-1]
            tail = top.split(common)
            for k, end in enumerate(ends):
                if end is top:
                    ends[k] = tail
        if len(seq) > common:
            parent = path[-1] if path else None
            segment = _Segment(common, len(seq), len(tokens), parent)
            (parent.children if parent else roots).append(segment)
            tokens.extend(seq[common:])
            positions.extend(range(common, len(seq)))
            path.append(segment)
        ends[i] = path[-1]
    paths = []
    for end in ends:
        chain = []
        while end is not None:
            chain.append(end)
            end = end.parent
        paths.append([r for s in reversed(chain) for r in _rows(s)])
    # lay the row out in the order the attention chunks produce it: their outputs then concatenate, and a
    # chunk of equal segments (or a family's context of one segment) is a contiguous slice, not a gather
    calls = _calls(roots)
    order = [r for _, group in calls for s in group for r in _rows(s)]
    new = [0] * len(order)
    for i, r in enumerate(order):
        new[r] = i
    chunks, start = [], 0
    for context, group in calls:
        chunks.append(_chunk([new[r] for r in context], [[new[r] for r in _rows(s)] for s in group], start, device))
        start += sum(s.end - s.start for s in group)
    return Packed([tokens[r] for r in order], [positions[r] for r in order], [[new[r] for r in p] for p in paths],
                  PackedAttention(tuple(chunks)))


def _rows(segment: _Segment) -> range:
    return range(segment.row, segment.row + segment.end - segment.start)


def _calls(roots: list[_Segment]) -> list[tuple[list[int], list[_Segment]]]:
    """(the ancestors' rows, sibling segments) of each attention call."""
    calls = []
    families: list[tuple[list[int], list[_Segment]]] = [([], roots)]
    while families:
        context, members = families.pop()
        calls += [(context, group) for group in _by_width(members, len(context))]
        families += [(context + list(_rows(m)), m.children) for m in members if m.children]
    return calls


def _by_width(members: list[_Segment], context: int) -> list[list[_Segment]]:
    """Siblings grouped, longest first, so that padding them to their longest stays within ``PAD_SLACK`` and a
    call holds at most ``CALL_KEYS`` key positions (its context's once per segment, and the segments')."""
    groups: list[list[_Segment]] = []
    real = 0
    for m in sorted(members, key=lambda s: -(s.end - s.start)):
        n = m.end - m.start
        width = groups[-1][0].end - groups[-1][0].start if groups else 0
        if (groups and (len(groups[-1]) + 1) * width <= PAD_SLACK * (real + n)
                and (len(groups[-1]) + 1) * (context + width) <= CALL_KEYS):
            groups[-1].append(m)
            real += n
        else:
            groups.append([m])
            real = n
    return groups


def _chunk(context: list[int], members: list[list[int]], start: int, device: torch.device) -> AttentionChunk:
    """One call: ``members`` are the segments' packed rows (consecutive from ``start``), ``context`` their
    ancestors'."""
    a, n = len(context), len(members)
    width = max(len(m) for m in members)
    offsets = torch.arange(width)
    lengths = torch.tensor([len(m) for m in members])
    valid = offsets[None, :] < lengths[:, None]
    rows = None
    if not bool(valid.all()):
        rows = torch.where(valid, torch.tensor([m[0] for m in members])[:, None] + offsets[None, :], 0).to(device)
    contiguous = context == list(range(context[0], context[0] + a)) if a else True
    where = slice(context[0] if a else 0, (context[0] if a else 0) + a) if contiguous else \
        torch.tensor(context, dtype=torch.long, device=device)
    query_positions = a + offsets[None, :].expand(n, width)
    key_positions = torch.cat([torch.arange(a)[None, :].expand(n, a), query_positions], dim=1)
    key_valid = torch.cat([torch.ones((n, a), dtype=torch.bool), valid], dim=1)
    return AttentionChunk(start, where, rows, valid.to(device), query_positions.to(device), key_positions.to(device),
                          key_valid.to(device))
