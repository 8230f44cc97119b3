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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from effcompile.analysis import DeviceProfile, exposed_copy_seconds, seconds_cost

from .plan import Candidate, Problem, evaluate

MAX_REGION_PLANS = 50_000
DP_BUCKETS = 4000
MAX_OFFLOAD_CHOICES = 12  # per region: the largest offloadable storages whose subsets are enumerated


@dataclass
class OffloadModel:
    """What the planner knows about offloading: which storages may move to host memory, the compute each
    region's copies overlap (region → (forward seconds of the region after it, backward seconds of the region
    after it), real seconds), the host link's bytes/s, and ``time_scale`` = real seconds ÷ roofline seconds
    (exposed copy seconds are divided by it to add up with roofline recompute costs)."""

    storages: set[int]
    windows: dict[int, tuple[float, float]]
    link_bytes_per_second: float
    profile: DeviceProfile
    widen: bool = False  # "on": then offload every further kept storage whose copies hide completely
    time_scale: float = 1.0

    def exposed_cost(self, seconds: float) -> float:
        """Exposed copy seconds in the solver's unit (roofline FLOP-equivalents)."""
        return seconds_cost(seconds / self.time_scale, self.profile)

    def exposed_seconds(self, region: int, nbytes: float) -> float:
        """Copy seconds of ``nbytes`` offloaded in ``region`` that its windows cannot hide (both ways)."""
        forward, backward = self.windows.get(region, (0.0, 0.0))
        return (exposed_copy_seconds(nbytes, forward, self.link_bytes_per_second) +
                exposed_copy_seconds(nbytes, backward, self.link_bytes_per_second))


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


@dataclass
class _RegionOption:
    """One plan for one region: which of its candidates, the bytes it keeps on the device of the region's
    own storages, its largest recompute transient and its cost; with offload, also the kept storages moved
    to host memory (canonical indices, see ``_region_signature``), their bytes and exposed copy seconds."""

    chosen: tuple[int, ...]
    kept_bytes: int
    transient_bytes: int
    cost: float
    kept: frozenset[int] = frozenset()
    offloaded: frozenset[int] = frozenset()
    offloaded_bytes: int = 0
    exposed_seconds: float = 0.0


def _region_options(problem: Problem, candidates: Sequence[Candidate], local: dict[int, int],
                    ) -> list[_RegionOption] | None:
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
        options.append(_RegionOption(chosen, sum(local[k] for k in kept), transient,
                                     sum(candidates[i].cost for i in chosen), frozenset(kept)))
    return options


def _region_signature(problem: Problem, candidates: Sequence[Candidate], local: dict[int, int],
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
class _Layout:
    """The regions' structure: candidates by region, bytes always kept (shared storages), each region's
    own storages, its options (shared by identical regions) and its canonical storage names."""

    by_region: dict[int, list[Candidate]]
    shared: int
    local: dict[int, dict[int, int]]
    options: dict[int, list[_RegionOption]]
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


def _layout(problem: Problem, candidates: Sequence[Candidate]) -> _Layout | None:
    """Group ``candidates`` by region and enumerate each region's options; None when a region has more
    than ``MAX_REGION_PLANS``."""
    by_region: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_region.setdefault(candidate.region, []).append(candidate)
    owners, shared = storage_owners(problem, candidates)
    layout = _Layout(by_region, shared, {}, {}, {}, {}, {})
    cache: dict[tuple, list[_RegionOption]] = {}
    for region, members in by_region.items():
        local = {k: problem.storage_bytes[k] for k, regions in owners.items() if regions == {region}}
        signature, names = _region_signature(problem, members, local)
        if signature not in cache:
            options = _region_options(problem, members, local)
            if options is None:
                return None
            cache[signature] = options
            layout.representative[signature] = region
        layout.local[region], layout.names[region], layout.signature[region] = local, names, signature
        layout.options[region] = cache[signature]
    return layout


def _pareto(options: Sequence[_RegionOption]) -> list[_RegionOption]:
    """Options not dominated in (kept bytes, transient, FLOPs)."""
    kept: list[_RegionOption] = []
    for option in sorted(options, key=lambda o: (o.cost, o.kept_bytes, o.transient_bytes)):
        if not any(k.kept_bytes <= option.kept_bytes and k.transient_bytes <= option.transient_bytes
                   for k in kept):
            kept.append(option)
    return kept


def _buckets(nbytes: float, unit: float) -> int:
    return math.ceil(nbytes / unit - 1e-9)


def _knapsack(regions: Sequence[int], frontier: dict[int, list[_RegionOption]], unit: float, budget: float,
              shared: float, reserve: int = 0) -> tuple[float, list[tuple[int, _RegionOption]]] | None:
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
            need = _buckets(option.kept_bytes, unit)
            # Recomputing (and fetching back) this region's storages happens while everything kept up to here is held.
            limit = buckets - _buckets(option.transient_bytes + option.offloaded_bytes, unit) - reserve
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
    chosen: list[tuple[int, _RegionOption]] = []
    for position in range(len(regions) - 1, -1, -1):
        region = regions[position]
        option = frontier[region][int(picks[position][m])]
        chosen.append((region, option))
        m -= _buckets(option.kept_bytes, unit)
    return cost, chosen[::-1]


def _prune_offload(options: Sequence[_RegionOption], unit: float) -> list[_RegionOption]:
    """Options not dominated in (kept buckets, transient + offload buckets, offload buckets, cost): what the
    offload knapsack sees (the offload buckets limit the next region's room)."""
    if not options:
        return []
    need = np.array([_buckets(o.kept_bytes, unit) for o in options])
    extra = np.array([_buckets(o.transient_bytes + o.offloaded_bytes, unit) for o in options])
    off = np.array([_buckets(o.offloaded_bytes, unit) for o in options])
    cost = np.array([o.cost for o in options])
    kept: list[int] = []
    for i in np.lexsort((off, extra, need, cost)):  # cheapest first: only a cheaper option can dominate
        if kept:
            k = np.array(kept)
            if np.any((need[k] <= need[i]) & (extra[k] <= extra[i]) & (off[k] <= off[i])):
                continue
        kept.append(int(i))
    return [options[i] for i in kept]


def _knapsack_offload(rows: Sequence[Sequence[_RegionOption]], unit: float, budget: float, shared: float,
                      ) -> tuple[float, list[_RegionOption]] | None:
    """Least total cost of one option per region (``rows[r]``: region r's options, every region in graph
    order) with, at each region, kept so far + its transient + its offload + the previous region's offload
    ≤ budget − shared (all in buckets). State: (kept buckets, the previous region's offload buckets)."""
    buckets = int((budget - shared) // unit)
    if buckets < 0:
        return None
    buckets = min(buckets, 4 * DP_BUCKETS)
    widest = max((_buckets(o.offloaded_bytes, unit) for options in rows for o in options), default=0)
    table = np.full((buckets + 1, widest + 1), np.inf)
    table[0, 0] = 0.0
    kept_range = np.arange(buckets + 1)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    for options in rows:
        prefix = np.minimum.accumulate(table, axis=1)  # best over the previous region's offload ≤ j
        argument = np.zeros(table.shape, dtype=np.int32)
        for j in range(1, widest + 1):
            argument[:, j] = np.where(table[:, j] < prefix[:, j - 1], j, argument[:, j - 1])
        new = np.full(table.shape, np.inf)
        pick = np.full(table.shape, -1, dtype=np.int32)
        for i, option in enumerate(options):
            need, off = _buckets(option.kept_bytes, unit), _buckets(option.offloaded_bytes, unit)
            limit = buckets - need - _buckets(option.transient_bytes + option.offloaded_bytes, unit)
            if limit < 0:
                continue
            before = kept_range[:limit + 1]
            value = prefix[before, np.minimum(limit - before, widest)] + option.cost
            better = value < new[before + need, off]
            new[before[better] + need, off] = value[better]
            pick[before[better] + need, off] = i
        if not np.isfinite(new).any():
            return None
        history.append((pick, argument))
        table = new
    kept, previous = np.unravel_index(int(np.argmin(table)), table.shape)
    cost = float(table[kept, previous])
    chosen: list[_RegionOption] = []
    for options, (pick, argument) in zip(reversed(rows), reversed(history)):
        option = options[int(pick[kept, previous])]
        chosen.append(option)
        kept -= _buckets(option.kept_bytes, unit)
        limit = buckets - _buckets(option.kept_bytes, unit) - _buckets(option.transient_bytes + option.offloaded_bytes, unit)
        previous = int(argument[kept, min(limit - kept, widest)])
    return cost, chosen[::-1]


def _subset_sums(movable: Sequence[int], sizes: dict[int, int]) -> list[tuple[int, frozenset[int]]]:
    """Each distinct total of a subset of ``movable`` (canonical indices) with the fewest storages reaching it."""
    best: dict[int, frozenset[int]] = {0: frozenset()}
    for index in movable:
        for total, subset in list(best.items()):
            grown, members = total + sizes[index], subset | {index}
            if grown not in best or len(best[grown]) > len(members):
                best[grown] = members
    return sorted(best.items())


def _offload_options(problem: Problem, layout: _Layout, region: int, model: OffloadModel, unit: float,
                     ) -> list[_RegionOption]:
    """``region``'s options with every subset of their kept offloadable storages moved to host memory (the
    subset with the fewest storages per total; per option only the cheapest per bucket triple)."""
    names = layout.names[region]
    representative = layout.names[layout.representative[layout.signature[region]]]
    sizes = {names[k]: b for k, b in layout.local[region].items() if k in model.storages}
    movable_all = set(sorted(sizes, key=lambda i: (-sizes[i], i))[:MAX_OFFLOAD_CHOICES])
    groups: dict[frozenset[int], list[_RegionOption]] = {}
    for option in layout.options[region]:
        movable = frozenset(representative[k] for k in option.kept) & movable_all
        groups.setdefault(movable, []).append(option)
    rows: list[_RegionOption] = []
    for movable, options in groups.items():
        sums = _subset_sums(sorted(movable), sizes)
        totals = np.array([total for total, _ in sums], dtype=np.float64)
        exposed = np.array([model.exposed_seconds(region, total) for total, _ in sums])
        for option in options:
            need = np.ceil((option.kept_bytes - totals) / unit - 1e-9).astype(np.int64)
            extra = np.ceil((option.transient_bytes + totals) / unit - 1e-9).astype(np.int64)
            off = np.ceil(totals / unit - 1e-9).astype(np.int64)
            span = int(max(need.max(), extra.max(), off.max())) + 1
            # Totals ascend: the first of each bucket triple moves the fewest bytes (and exposes the least).
            _, first = np.unique((need * span + extra) * span + off, return_index=True)
            for index in first[np.isfinite(exposed[first])]:
                total, subset = sums[index]
                rows.append(_RegionOption(option.chosen, option.kept_bytes - total, option.transient_bytes,
                                          option.cost + model.exposed_cost(float(exposed[index])),
                                          option.kept, subset, total, float(exposed[index])))
    return rows


def _solution(problem: Problem, layout: _Layout, chosen: Sequence[tuple[int, _RegionOption]], cost: float) -> Solution:
    segments: list[Candidate] = []
    offloaded: dict[int, int] = {}
    exposed = 0.0
    for region, option in chosen:
        segments.extend(layout.by_region[region][i] for i in option.chosen)
        storage_of = {index: k for k, index in layout.names[region].items()}
        offloaded.update({storage_of[index]: region for index in option.offloaded})
        exposed += option.exposed_seconds
    return Solution(sorted(segments, key=lambda c: c.start), offloaded, cost, exposed)


def _solve(problem: Problem, layout: _Layout, budget: float, offload: OffloadModel | None,
           frontier: dict[int, list[_RegionOption]]) -> Solution | None:
    """The cheapest plan within ``budget``: recompute only, or (with ``offload``) the offload knapsack's plan
    when it is strictly cheaper."""
    regions = sorted(layout.options)
    unit = max(problem.baseline_bytes, 1) / DP_BUCKETS
    solved = _knapsack(regions, frontier, unit, budget, layout.shared)
    best = _solution(problem, layout, solved[1], solved[0]) if solved is not None else None
    if offload is None or not offload.storages:
        return best
    pruned: dict[tuple, list[_RegionOption]] = {}
    rows: list[list[_RegionOption]] = []
    for region in range(len(problem.regions)):  # every region: the previous one's prefetch must fit in each
        if region not in layout.options:
            rows.append([_RegionOption((), 0, 0, 0.0)])
            continue
        key = (layout.signature[region], offload.windows.get(region),
               frozenset(layout.names[region][k] for k in layout.local[region] if k in offload.storages))
        if key not in pruned:
            pruned[key] = _prune_offload(_offload_options(problem, layout, region, offload, unit), unit)
        rows.append(pruned[key])
    solved_offload = _knapsack_offload(rows, unit, budget, layout.shared)
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
    layout = _layout(problem, candidates)
    if layout is None:
        return None, "too many region plans", 0
    frontier: dict[int, list[_RegionOption]] = {}
    by_signature: dict[tuple, list[_RegionOption]] = {}
    for region in layout.options:
        signature = layout.signature[region]
        if signature not in by_signature:
            by_signature[signature] = _pareto(layout.options[region])
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


def storage_regions(problem: Problem, segments: Sequence[Candidate]) -> dict[int, int]:
    """Storage id → the one region (index of ``problem.regions``) that saves or consumes it under the plan
    ``segments``; storages used by several regions (or by nodes outside every region) are left out."""
    region_of = {n: r for r, (_, run) in enumerate(problem.regions) for n in run}
    covered = {n for c in segments for n in c.members}
    owners: dict[int, set[int]] = {}
    for node in problem.nodes:
        if node not in covered:
            for k in problem.saved[node]:
                owners.setdefault(k, set()).add(region_of.get(node, -1))
    for candidate in segments:
        for k in candidate.inputs:
            owners.setdefault(k, set()).add(candidate.region)
    return {k: next(iter(r)) for k, r in owners.items() if len(r) == 1 and -1 not in r}


def exposed_seconds(problem: Problem, offloaded: dict[int, int], model: OffloadModel) -> float:
    """Copy seconds of the plan's offloads that their regions' windows cannot hide."""
    by_region: dict[int, int] = {}
    for k, region in offloaded.items():
        by_region[region] = by_region.get(region, 0) + problem.storage_bytes[k]
    return sum(model.exposed_seconds(region, nbytes) for region, nbytes in by_region.items())


def widen_offload(problem: Problem, segments: Sequence[Candidate], offloaded: dict[int, int], model: OffloadModel,
                  budget_bytes: float | None) -> dict[int, int]:
    """``offloaded`` plus, region by region, the largest set of further kept eligible storages whose copies
    still hide completely behind the region's windows, kept only while the predicted peak stays within
    ``budget_bytes`` (None: does not rise). Used by ``offload=on`` and by the ``blocks``/``sqrt`` policies."""
    current = dict(offloaded)
    limit = budget_bytes if budget_bytes is not None else evaluate(problem, segments, current).peak_bytes
    kept = evaluate_kept(problem, segments)
    owned = storage_regions(problem, segments)
    for region in range(len(problem.regions)):
        forward, backward = model.windows.get(region, (0.0, 0.0))
        room = model.link_bytes_per_second * min(forward, backward)
        room -= sum(problem.storage_bytes[k] for k, r in current.items() if r == region)
        movable = sorted((k for k, r in owned.items() if r == region and k in kept and k in model.storages
                          and k not in current), key=lambda k: (-problem.storage_bytes[k], k))[:MAX_OFFLOAD_CHOICES]
        if room <= 0 or not movable:
            continue
        sizes = {k: problem.storage_bytes[k] for k in movable}
        fitting = [(total, subset) for total, subset in _subset_sums(movable, sizes) if 0 < total <= room]
        if not fitting:
            continue
        trial = {**current, **{k: region for k in max(fitting, key=lambda pair: pair[0])[1]}}
        if evaluate(problem, segments, trial).peak_bytes <= limit:
            current = trial
    return current


def evaluate_kept(problem: Problem, segments: Sequence[Candidate]) -> set[int]:
    """The storages a plan keeps for backward (saved outside every segment, or a segment's inputs)."""
    covered = {n for c in segments for n in c.members}
    kept = {k for n in problem.nodes if n not in covered for k in problem.saved[n]}
    return kept | {k for c in segments for k in c.inputs}
