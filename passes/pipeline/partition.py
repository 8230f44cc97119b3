"""Exact balanced contiguous partition, the solver behind the ``pipeline`` pass.

A graph's compute nodes, in topological order, are grouped into ``units`` (runs of nodes between two
places where a cut is allowed). Cutting the unit list into K contiguous, non-empty groups:

1. minimise the largest group cost ``C*`` (dynamic programming over prefix sums, exact);
2. among the partitions whose largest group costs at most ``C* * (1 + slack)``, minimise the total bytes
   sent across the cuts (a second exact dynamic program), so cuts land where few activations cross.

Both programs are O(K * m^2) in the number of units ``m`` with the inner minimum vectorised by numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """``starts``: index of the first unit of each group (``starts[0] == 0``); ``group_costs``: the cost of
    each group; ``max_cost``: the largest; ``best_max_cost``: the optimum of step 1 (equal when slack is 0 or
    no cheaper-to-cut partition exists); ``cut_bytes``: bytes crossing each cut (K-1 values)."""

    starts: tuple[int, ...]
    group_costs: tuple[float, ...]
    max_cost: float
    best_max_cost: float
    cut_bytes: tuple[float, ...]


def _array(values: Sequence[float]) -> np.ndarray:
    if all(isinstance(v, (int, np.integer)) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.float64)


def min_max_cost(costs: Sequence[float], groups: int) -> float:
    """The smallest achievable largest-group cost when ``costs`` (m ≥ groups non-negative numbers) is cut
    into ``groups`` contiguous non-empty groups."""
    values = _array(costs)
    m = len(values)
    if groups < 1 or groups > m:
        raise ValueError(f"cannot cut {m} units into {groups} non-empty groups")
    prefix = np.concatenate([[0], np.cumsum(values)])
    best = prefix[1:].astype(np.float64)  # best[j-1]: one group over units [0, j)
    best = np.concatenate([[np.inf], best])  # index j = number of units covered
    for k in range(2, groups + 1):
        new = np.full(m + 1, np.inf)
        for j in range(k, m + 1):
            i = np.arange(k - 1, j)
            new[j] = np.min(np.maximum(best[i], prefix[j] - prefix[i]))
        best = new
    return float(best[m])


def solve(costs: Sequence[float], groups: int, cut_bytes: Sequence[float] | None = None,
          slack: float = 0.0) -> Partition:
    """Cut ``costs`` (one non-negative cost per unit) into ``groups`` contiguous non-empty groups: minimal
    largest cost first, then minimal total ``cut_bytes`` (``cut_bytes[i]``: bytes crossing a cut placed
    before unit ``i``; index 0 unused) among partitions within ``slack`` of that minimum.

    Raises ValueError when there are fewer units than groups.
    """
    values = _array(costs)
    m = len(values)
    if groups < 1 or groups > m:
        raise ValueError(f"cannot cut {m} units into {groups} non-empty groups")
    traffic = np.zeros(m, dtype=np.float64) if cut_bytes is None else np.asarray(cut_bytes, dtype=np.float64)
    if len(traffic) != m:
        raise ValueError(f"cut_bytes has {len(traffic)} entries for {m} units")
    prefix = np.concatenate([[0], np.cumsum(values)])
    best_max = min_max_cost(values.tolist(), groups)
    bound = best_max * (1.0 + slack)
    if values.dtype == np.float64:
        bound += 1e-12 * abs(bound)
    # total[k][j]: least bytes to cover units [0, j) with k groups, each costing ≤ bound.
    total = np.full(m + 1, np.inf)
    total[1:] = np.where(prefix[1:] - prefix[0] <= bound, 0.0, np.inf)
    choices: list[np.ndarray] = []
    for k in range(2, groups + 1):
        new = np.full(m + 1, np.inf)
        choice = np.zeros(m + 1, dtype=np.int64)
        for j in range(k, m + 1):
            i = np.arange(k - 1, j)
            candidate = np.where(prefix[j] - prefix[i] <= bound, total[i] + traffic[i], np.inf)
            at = int(np.argmin(candidate))
            new[j], choice[j] = candidate[at], i[at]
        choices.append(choice)
        total = new
    if not np.isfinite(total[m]):  # cannot happen: the step-1 optimum satisfies the bound
        raise RuntimeError("no partition within the bound; this is a bug in the solver")
    starts, j = [], m
    for choice in reversed(choices):
        j = int(choice[j])
        starts.append(j)
    starts = [0] + starts[::-1]
    ends = starts[1:] + [m]
    group_costs = tuple(float(prefix[e] - prefix[s]) for s, e in zip(starts, ends))
    return Partition(tuple(starts), group_costs, max(group_costs), float(best_max),
                     tuple(float(traffic[s]) for s in starts[1:]))
