"""``remat``'s offload model for the exact solver (see ``solve.py``'s docstring): which storages may move to
pinned host memory and what their copies cost where the regions' windows cannot hide them, each region's
offload options (subsets of its kept storages), the second knapsack (state: kept buckets, the previous
region's offload buckets), and ``widen_offload`` for ``offload=on`` and the ``blocks``/``sqrt`` policies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from effcompile.analysis import DeviceProfile, exposed_copy_seconds, seconds_cost

from .plan import Candidate, Problem, evaluate
from .regions import DP_BUCKETS, Layout, RegionOption, to_buckets

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


def prune_offload(options: Sequence[RegionOption], unit: float) -> list[RegionOption]:
    """Options not dominated in (kept buckets, transient + offload buckets, offload buckets, cost): what the
    offload knapsack sees (the offload buckets limit the next region's room)."""
    if not options:
        return []
    need = np.array([to_buckets(o.kept_bytes, unit) for o in options])
    extra = np.array([to_buckets(o.transient_bytes + o.offloaded_bytes, unit) for o in options])
    off = np.array([to_buckets(o.offloaded_bytes, unit) for o in options])
    cost = np.array([o.cost for o in options])
    kept: list[int] = []
    for i in np.lexsort((off, extra, need, cost)):  # cheapest first: only a cheaper option can dominate
        if kept:
            k = np.array(kept)
            if np.any((need[k] <= need[i]) & (extra[k] <= extra[i]) & (off[k] <= off[i])):
                continue
        kept.append(int(i))
    return [options[i] for i in kept]


def knapsack_offload(rows: Sequence[Sequence[RegionOption]], unit: float, budget: float, shared: float,
                      ) -> tuple[float, list[RegionOption]] | None:
    """Least total cost of one option per region (``rows[r]``: region r's options, every region in graph
    order) with, at each region, kept so far + its transient + its offload + the previous region's offload
    ≤ budget − shared (all in buckets). State: (kept buckets, the previous region's offload buckets)."""
    buckets = int((budget - shared) // unit)
    if buckets < 0:
        return None
    buckets = min(buckets, 4 * DP_BUCKETS)
    widest = max((to_buckets(o.offloaded_bytes, unit) for options in rows for o in options), default=0)
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
            need, off = to_buckets(option.kept_bytes, unit), to_buckets(option.offloaded_bytes, unit)
            limit = buckets - need - to_buckets(option.transient_bytes + option.offloaded_bytes, unit)
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
    chosen: list[RegionOption] = []
    for options, (pick, argument) in zip(reversed(rows), reversed(history)):
        option = options[int(pick[kept, previous])]
        chosen.append(option)
        kept -= to_buckets(option.kept_bytes, unit)
        limit = buckets - to_buckets(option.kept_bytes, unit) - to_buckets(option.transient_bytes + option.offloaded_bytes, unit)
        previous = int(argument[kept, min(limit - kept, widest)])
    return cost, chosen[::-1]


def subset_sums(movable: Sequence[int], sizes: dict[int, int]) -> list[tuple[int, frozenset[int]]]:
    """Each distinct total of a subset of ``movable`` (canonical indices) with the fewest storages reaching it."""
    best: dict[int, frozenset[int]] = {0: frozenset()}
    for index in movable:
        for total, subset in list(best.items()):
            grown, members = total + sizes[index], subset | {index}
            if grown not in best or len(best[grown]) > len(members):
                best[grown] = members
    return sorted(best.items())


def offload_options(problem: Problem, layout: Layout, region: int, model: OffloadModel, unit: float,
                     ) -> list[RegionOption]:
    """``region``'s options with every subset of their kept offloadable storages moved to host memory (the
    subset with the fewest storages per total; per option only the cheapest per bucket triple)."""
    names = layout.names[region]
    representative = layout.names[layout.representative[layout.signature[region]]]
    sizes = {names[k]: b for k, b in layout.local[region].items() if k in model.storages}
    movable_all = set(sorted(sizes, key=lambda i: (-sizes[i], i))[:MAX_OFFLOAD_CHOICES])
    groups: dict[frozenset[int], list[RegionOption]] = {}
    for option in layout.options[region]:
        movable = frozenset(representative[k] for k in option.kept) & movable_all
        groups.setdefault(movable, []).append(option)
    rows: list[RegionOption] = []
    for movable, options in groups.items():
        sums = subset_sums(sorted(movable), sizes)
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
                rows.append(RegionOption(option.chosen, option.kept_bytes - total, option.transient_bytes,
                                          option.cost + model.exposed_cost(float(exposed[index])),
                                          option.kept, subset, total, float(exposed[index])))
    return rows


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
        fitting = [(total, subset) for total, subset in subset_sums(movable, sizes) if 0 < total <= room]
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
