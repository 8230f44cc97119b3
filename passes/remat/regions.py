"""``remat``'s regions for the exact solver (see ``solve.py``'s docstring): each region's options (every set
of its disjoint candidates, costed: bytes it keeps, its largest recompute transient, its cost), identical
regions found by signature and enumerated once, dominated options dropped, and the knapsack over regions
in graph order that picks one option per region within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .plan import Candidate, Problem

MAX_REGION_PLANS = 50_000
DP_BUCKETS = 4000


@dataclass
class RegionOption:
    """One plan for one region: which of its candidates, the bytes it keeps on the device of the region's
    own storages, its largest recompute transient and its cost; with offload, also the kept storages moved
    to host memory (canonical indices, see ``region_signature``), their bytes and exposed copy seconds."""

    chosen: tuple[int, ...]
    kept_bytes: int
    transient_bytes: int
    cost: float
    kept: frozenset[int] = frozenset()
    offloaded: frozenset[int] = frozenset()
    offloaded_bytes: int = 0
    exposed_seconds: float = 0.0


def region_options(problem: Problem, candidates: Sequence[Candidate], local: dict[int, int],
                    ) -> list[RegionOption] | None:
    """Every set of pairwise disjoint ``candidates`` (one region's) with its cost, or None when there
    are more than ``MAX_REGION_PLANS``. ``local`` maps each storage only this region saves or consumes
    to its bytes."""
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].start)
    nodes = sorted({n for c in candidates for n in c.members} |
                   {n for n in problem.nodes if any(k in local for k in problem.saved[n])},
                   key=lambda n: problem.position[n])
    bit = {n: 1 << i for i, n in enumerate(nodes)}
    masks = [sum(bit[n] for n in c.members) for c in candidates]
    savers: dict[int, int] = {}
    for node in nodes:
        for k in problem.saved[node]:
            if k in local:
                savers[k] = savers.get(k, 0) | bit[node]
    plans: list[tuple[int, ...]] = []

    def extend(chosen: tuple[int, ...], after: int, position: int) -> None:
        plans.append(chosen)
        if len(plans) > MAX_REGION_PLANS:
            return
        for j in range(after, len(order)):
            index = order[j]
            if candidates[index].start > position:
                extend(chosen + (index,), j + 1, candidates[index].end)

    extend((), 0, -1)
    if len(plans) > MAX_REGION_PLANS:
        return None
    options = []
    for chosen in plans:
        covered = 0
        kept: set[int] = set()
        for index in chosen:
            covered |= masks[index]
            kept.update(k for k in candidates[index].inputs if k in local)
        kept.update(k for k, mask in savers.items() if mask & ~covered)
        transient = max((sum(problem.storage_bytes[k] for k in candidates[i].internal) for i in chosen), default=0)
        options.append(RegionOption(chosen, sum(local[k] for k in kept), transient,
                                     sum(candidates[i].cost for i in chosen), frozenset(kept)))
    return options


def region_signature(problem: Problem, candidates: Sequence[Candidate], local: dict[int, int],
                      ) -> tuple[tuple, dict[int, int]]:
    """Equal for regions with the same structure (repeated blocks), so their options are computed once;
    and each storage's canonical index (the same storage role has the same index in identical regions)."""
    if not candidates:
        return (), {}
    base = min(c.start for c in candidates)
    storage_index: dict[int, int] = {}

    def name(k: int) -> tuple:
        return (storage_index.setdefault(k, len(storage_index)), problem.storage_bytes[k], k in local)

    parts = []
    for c in candidates:
        saved = tuple(tuple(name(k) for k in sorted(problem.saved[n])) for n in c.members)
        parts.append((c.start - base, c.end - base, c.cost, saved, tuple(name(k) for k in sorted(c.inputs)),
                      tuple(name(k) for k in sorted(c.internal))))
    return tuple(parts), storage_index


@dataclass
class Layout:
    """The regions' structure: candidates by region, bytes always kept (shared storages), each region's
    own storages, its options (shared by identical regions) and its canonical storage names."""

    by_region: dict[int, list[Candidate]]
    shared: int
    local: dict[int, dict[int, int]]
    options: dict[int, list[RegionOption]]
    names: dict[int, dict[int, int]]  # region → storage id → canonical index
    signature: dict[int, tuple]
    representative: dict[tuple, int]  # signature → the region whose storage ids its options use


def storage_owners(problem: Problem, candidates: Sequence[Candidate]) -> tuple[dict[int, set[int]], int]:
    """Storage id → the regions that save it or take it as a candidate's input (-1: a node outside every
    candidate), and the bytes of the storages more than one region (or such a node) uses: always kept."""
    owners: dict[int, set[int]] = {}
    region_of = {n: c.region for c in candidates for n in c.members}
    for node in problem.nodes:
        for k in problem.saved[node]:
            owners.setdefault(k, set()).add(region_of.get(node, -1))
    for candidate in candidates:
        for k in candidate.inputs:
            owners.setdefault(k, set()).add(candidate.region)
    shared = sum(problem.storage_bytes[k] for k, regions in owners.items() if len(regions) > 1 or -1 in regions)
    return owners, shared


def build_layout(problem: Problem, candidates: Sequence[Candidate]) -> Layout | None:
    """Group ``candidates`` by region and enumerate each region's options; None when a region has more
    than ``MAX_REGION_PLANS``."""
    by_region: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_region.setdefault(candidate.region, []).append(candidate)
    owners, shared = storage_owners(problem, candidates)
    layout = Layout(by_region, shared, {}, {}, {}, {}, {})
    cache: dict[tuple, list[RegionOption]] = {}
    for region, members in by_region.items():
        local = {k: problem.storage_bytes[k] for k, regions in owners.items() if regions == {region}}
        signature, names = region_signature(problem, members, local)
        if signature not in cache:
            options = region_options(problem, members, local)
            if options is None:
                return None
            cache[signature] = options
            layout.representative[signature] = region
        layout.local[region], layout.names[region], layout.signature[region] = local, names, signature
        layout.options[region] = cache[signature]
    return layout


def pareto(options: Sequence[RegionOption]) -> list[RegionOption]:
    """Options not dominated in (kept bytes, transient, FLOPs)."""
    kept: list[RegionOption] = []
    for option in sorted(options, key=lambda o: (o.cost, o.kept_bytes, o.transient_bytes)):
        if not any(k.kept_bytes <= option.kept_bytes and k.transient_bytes <= option.transient_bytes
                   for k in kept):
            kept.append(option)
    return kept


def to_buckets(nbytes: float, unit: float) -> int:
    """``nbytes`` in the knapsack's memory steps of ``unit`` bytes, rounded up (a float's noise ignored)."""
    return math.ceil(nbytes / unit - 1e-9)


def knapsack(regions: Sequence[int], frontier: dict[int, list[RegionOption]], unit: float, budget: float,
              shared: float, reserve: int = 0) -> tuple[float, list[tuple[int, RegionOption]]] | None:
    """Least total cost of one option per region with, at each region, kept so far + its transient + its
    offload + ``reserve`` buckets ≤ budget − shared; None when no choice fits. Returns the cost and the
    chosen (region, option) pairs."""
    buckets = int((budget - shared) // unit)
    if buckets < 0:
        return None
    buckets = min(buckets, 4 * DP_BUCKETS)
    table = np.full(buckets + 1, np.inf)  # least cost with the regions so far keeping exactly m buckets
    table[0] = 0.0
    picks: list[np.ndarray] = []
    for region in regions:
        new = np.full(buckets + 1, np.inf)
        pick = np.full(buckets + 1, -1)
        for i, option in enumerate(frontier[region]):
            need = to_buckets(option.kept_bytes, unit)
            # Recomputing (and fetching back) this region's storages happens while everything kept up to here is held.
            limit = buckets - to_buckets(option.transient_bytes + option.offloaded_bytes, unit) - reserve
            if need > limit:
                continue
            shifted = np.full(buckets + 1, np.inf)
            shifted[need:limit + 1] = table[:limit + 1 - need] + option.cost
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = i
        if not np.isfinite(new).any():
            return None
        table = new
        picks.append(pick)
    m = int(np.argmin(table))
    cost = float(table[m])
    chosen: list[tuple[int, RegionOption]] = []
    for position in range(len(regions) - 1, -1, -1):
        region = regions[position]
        option = frontier[region][int(picks[position][m])]
        chosen.append((region, option))
        m -= to_buckets(option.kept_bytes, unit)
    return cost, chosen[::-1]
