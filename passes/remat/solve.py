"""``remat``'s solvers: an exact per-region enumeration + knapsack DP (recompute, and optionally offload to
host memory), and a greedy fallback for regions with too many plans.

Recompute (``solve_dp`` without an ``OffloadModel``). Kept bytes = storages shared by several regions
(always counted) + each region's own kept storages; peak ≤ kept + the largest recompute transient (an
upper bound of ``plan.evaluate``'s peak). For each region every set of disjoint candidates is costed
(identical regions — repeated blocks — once), dominated options dropped, then a knapsack over regions in
graph order (memory in ``DP_BUCKETS`` steps of the baseline, rounded up) picks one option per region,
allowing a region's recomputation only while (kept so far + its transient) ≤ budget − shared.

Offload (with an ``OffloadModel``). Each option's kept storages that may be offloaded (local to the region,
produced by a graph node, not returned by the graph) can each be kept or moved to pinned host memory.
An offloaded subset of ``s`` bytes lowers what the region keeps on the device by ``s``, costs the copy
time that its region's windows cannot hide (``OffloadModel.exposed_seconds``: device→host beside the next
region's forward, host→device beside its backward), and is back on the device during its region's
backward and while the region after it runs backward (the prefetch). A second knapsack, whose state is
(kept buckets, the previous region's offload buckets), holds at each region r: kept so far + r's
transient + r's offload + (r−1)'s offload ≤ budget − shared, and its plan is taken when it is cheaper
than the recompute-only one. Exact within that model (options are compared after rounding to buckets,
as the knapsack sees them); the subsets are enumerated over each region's ``MAX_OFFLOAD_CHOICES``
largest offloadable storages.

The region enumeration and the recompute knapsack live in ``regions.py``, the offload model and its
knapsack in ``offload_solve.py``; this module puts them together (``solve_dp``, ``optimise``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .offload_solve import (  # re-exported: the offload model's names stay importable from here
    MAX_OFFLOAD_CHOICES as MAX_OFFLOAD_CHOICES,
)
from .offload_solve import (
    OffloadModel as OffloadModel,
)
from .offload_solve import (
    evaluate_kept as evaluate_kept,
)
from .offload_solve import (
    exposed_seconds as exposed_seconds,
)
from .offload_solve import (
    knapsack_offload,
    offload_options,
    prune_offload,
)
from .offload_solve import (
    storage_regions as storage_regions,
)
from .offload_solve import (
    widen_offload as widen_offload,
)
from .plan import Candidate, Problem, evaluate
from .regions import DP_BUCKETS as DP_BUCKETS
from .regions import MAX_REGION_PLANS as MAX_REGION_PLANS
from .regions import Layout, RegionOption, build_layout, knapsack, pareto
from .regions import storage_owners as storage_owners


@dataclass
class Solution:
    """A plan: the segments to checkpoint, the storages to offload (id → region) and its modelled cost
    (FLOP-equivalents: recompute + exposed copies; seconds of exposed copies)."""

    segments: list[Candidate]
    offloaded: dict[int, int] = field(default_factory=dict)
    cost: float = 0.0
    exposed_seconds: float = 0.0


def solve_greedy(problem: Problem, candidates: Sequence[Candidate], budget_bytes: float | None) -> list[Candidate]:
    """Fallback for large graphs: first the fine segments, best FLOPs-per-byte-freed first, then whole
    regions in place of their fine segments, until the predicted peak fits ``budget_bytes`` (None: go
    to the end, the smallest peak this order reaches)."""
    plan: list[Candidate] = []
    target = -1.0 if budget_bytes is None else budget_bytes
    best = (evaluate(problem, plan).peak_bytes, list(plan))
    for kind in ("fine", "block"):
        pool = [c for c in candidates if c.kind == kind]
        freed = {id(c): max(1, sum(problem.storage_bytes[k] for k in c.internal) -
                            sum(problem.storage_bytes[k] for k in c.inputs)) for c in pool}
        for candidate in sorted(pool, key=lambda c: c.cost / freed[id(c)]):
            if evaluate(problem, plan).peak_bytes <= target:
                return plan
            trial = [c for c in plan if c.region != candidate.region] if kind == "block" else plan
            trial = trial + [candidate]
            peak = evaluate(problem, trial).peak_bytes
            if kind == "fine" or peak < evaluate(problem, plan).peak_bytes:
                plan = trial
                if peak < best[0]:
                    best = (peak, list(plan))
    return plan if evaluate(problem, plan).peak_bytes <= target else best[1]


def _solution(problem: Problem, layout: Layout, chosen: Sequence[tuple[int, RegionOption]], cost: float) -> Solution:
    segments: list[Candidate] = []
    offloaded: dict[int, int] = {}
    exposed = 0.0
    for region, option in chosen:
        segments.extend(layout.by_region[region][i] for i in option.chosen)
        storage_of = {index: k for k, index in layout.names[region].items()}
        offloaded.update({storage_of[index]: region for index in option.offloaded})
        exposed += option.exposed_seconds
    return Solution(sorted(segments, key=lambda c: c.start), offloaded, cost, exposed)


def _solve(problem: Problem, layout: Layout, budget: float, offload: OffloadModel | None,
           frontier: dict[int, list[RegionOption]]) -> Solution | None:
    """The cheapest plan within ``budget``: recompute only, or (with ``offload``) the offload knapsack's plan
    when it is strictly cheaper."""
    regions = sorted(layout.options)
    unit = max(problem.baseline_bytes, 1) / DP_BUCKETS
    solved = knapsack(regions, frontier, unit, budget, layout.shared)
    best = _solution(problem, layout, solved[1], solved[0]) if solved is not None else None
    if offload is None or not offload.storages:
        return best
    pruned: dict[tuple, list[RegionOption]] = {}
    rows: list[list[RegionOption]] = []
    for region in range(len(problem.regions)):  # every region: the previous one's prefetch must fit in each
        if region not in layout.options:
            rows.append([RegionOption((), 0, 0, 0.0)])
            continue
        key = (layout.signature[region], offload.windows.get(region),
               frozenset(layout.names[region][k] for k in layout.local[region] if k in offload.storages))
        if key not in pruned:
            pruned[key] = prune_offload(offload_options(problem, layout, region, offload, unit), unit)
        rows.append(pruned[key])
    solved_offload = knapsack_offload(rows, unit, budget, layout.shared)
    if solved_offload is None or (best is not None and not solved_offload[0] < best.cost * (1 - 1e-9) - 1e-9):
        return best
    chosen = [(region, option) for region, option in enumerate(solved_offload[1]) if region in layout.options]
    return _solution(problem, layout, chosen, solved_offload[0])


def solve_dp(problem: Problem, candidates: Sequence[Candidate], budget_bytes: float | None,
             offload: OffloadModel | None = None) -> tuple[Solution | None, str, int]:
    """Exact plan (within the models of this module's docstring) by per-region enumeration and a knapsack
    over regions. ``budget_bytes`` None: find the smallest reachable peak instead (bisection on the
    budget: feasibility is monotone). Returns (solution or None, status, smallest reachable peak in
    bytes under the model, for ``budget_bytes`` None)."""
    layout = build_layout(problem, candidates)
    if layout is None:
        return None, "too many region plans", 0
    frontier: dict[int, list[RegionOption]] = {}
    by_signature: dict[tuple, list[RegionOption]] = {}
    for region in layout.options:
        signature = layout.signature[region]
        if signature not in by_signature:
            by_signature[signature] = pareto(layout.options[region])
        frontier[region] = by_signature[signature]
    unit = max(problem.baseline_bytes, 1) / DP_BUCKETS
    if budget_bytes is None:
        low, high = layout.shared, float(problem.baseline_bytes) * 1.5 + layout.shared
        if _solve(problem, layout, high, offload, frontier) is None:
            return None, "smallest", int(high)
        for _ in range(30):
            middle = (low + high) / 2
            fits = _solve(problem, layout, middle, offload, frontier) is not None
            low, high = (low, middle) if fits else (middle, high)
            if high - low < unit:
                break
        return None, "smallest", math.ceil(high)
    solution = _solve(problem, layout, budget_bytes, offload, frontier)
    if solution is None:
        return None, "infeasible", 0
    return solution, "dp", 0


def optimise(problem: Problem, candidates: Sequence[Candidate], budget_bytes: float,
             offload: OffloadModel | None = None) -> tuple[Solution | None, str]:
    """The cheapest plan whose predicted peak fits ``budget_bytes``: the region DP, else (a region with
    too many plans) the greedy fallback, which recomputes only. None when nothing fits."""
    solution, status, _ = solve_dp(problem, candidates, budget_bytes, offload)
    if solution is not None:
        if evaluate(problem, solution.segments, solution.offloaded).peak_bytes <= budget_bytes:
            return solution, "dp"
    if status == "infeasible":
        return None, "dp"
    plan = solve_greedy(problem, candidates, budget_bytes)
    fits = evaluate(problem, plan).peak_bytes <= budget_bytes
    return (Solution(plan, {}, sum(c.cost for c in plan)) if fits else None), "greedy"


def smallest_peak(problem: Problem, candidates: Sequence[Candidate], offload: OffloadModel | None = None) -> int:
    """The smallest predicted peak (bytes) the solvers reach over ``candidates``: a budget at least
    this large is met."""
    _, status, smallest = solve_dp(problem, candidates, None, offload)
    if status == "too many region plans":
        return evaluate(problem, solve_greedy(problem, candidates, None)).peak_bytes
    return smallest
