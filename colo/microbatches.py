"""Splitting a batch of sequences into micro-batches under a token budget.

A micro-batch is right-padded to its longest sequence, so what it costs in activation memory is
``rows x longest``, not the sum of the lengths: that product is what the budget bounds. Sequences
are taken longest first, so sequences of similar length share a micro-batch (little padding) and
the largest micro-batch runs first (an out-of-memory error comes at once, not after minutes).
"""

from __future__ import annotations

from typing import Sequence


def plan(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices into ``lengths``, grouped so that ``len(group) * max(length in group) <= budget``.

    A sequence longer than the budget gets a micro-batch of its own. Every index appears once.
    """
    if budget < 1:
        raise ValueError(f"token budget {budget}; allowed: >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        # in descending order the first member of a group is its longest
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
