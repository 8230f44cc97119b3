"""Planning for ``remat``: candidate segments, the memory model of a plan, and the solvers (a per-region
enumeration + knapsack DP, and a greedy fallback).

Memory model (all from ``effcompile.analysis``, storages counted once, parameters never):
  * retained bytes = storages saved for backward by nodes outside every checkpointed segment, plus the
    tensor inputs of every checkpointed segment (non-reentrant checkpoint saves those);
  * peak bytes = max(retained, max over segments s of [retained storages first used at or before s's
    start + what s's recomputation saves]) — during backward, segment s is recomputed while the
    activations of everything before it are still held.
Recompute cost (what the solvers minimise), per node, in FLOP-equivalents:
  * ``cost="flops"``: forward FLOPs from the cost model (matmul/attention counted, other ops one per
    output element);
  * ``cost="time"`` (default): a roofline estimate, max(FLOPs, ``FLOPS_PER_BYTE`` × bytes the op writes
    and reads back) — elementwise ops are memory-bound, and in eager mode a chain of them costs about
    as much as the block's matmuls — plus ``SEGMENT_OVERHEAD_SHARE`` of the forward's cost per segment
    (each checkpoint call has a fixed Python/dispatch cost, so fewer, larger segments are preferred
    when they save as much). Views cost nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

from effcompile.analysis import Analysis
from effcompile.graph import block_index, module_path
from effcompile.patterns import MATMUL_FUNCTIONS, find_attention, find_linears

from .segment import segment_members

log = logging.getLogger(__name__)
aten = torch.ops.aten

MATMUL_TARGETS = MATMUL_FUNCTIONS | {aten.mm.default, aten.addmm.default, aten.linear.default, aten.baddbmm.default,
                                     torch.nn.functional.linear, torch.mm, torch.addmm, torch.baddbmm}
NORM_TARGETS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
                aten.group_norm.default, torch.nn.functional.layer_norm, torch.layer_norm}
SAVE_CLASSES = ("matmul", "attention", "norm")


@dataclass
class Candidate:
    """A contiguous run of nodes that could be checkpointed as one segment."""

    label: str  # "block 3", "block 3 part 2/7", "head part 1/2", "blocks 0-4"
    kind: str  # "block" (a whole region), "fine" (between saved ops), "group" (several blocks)
    region: int
    members: list[torch.fx.Node]
    start: int  # graph position of the first member
    end: int  # graph position of the last member
    flops: int = 0
    cost: float = 0.0  # recompute cost in FLOP-equivalents (see the module docstring)
    inputs: frozenset[int] = frozenset()  # storage ids of its tensor inputs
    internal: frozenset[int] = frozenset()  # storage ids its nodes save when recomputed

    def to_dict(self, storage_bytes: dict[int, int]) -> dict:
        """JSON-ready description (bytes of its saved inputs, FLOPs recomputed)."""
        return {"label": self.label, "kind": self.kind, "nodes": len(self.members),
                "first": self.members[0].name, "last": self.members[-1].name, "recompute_flops": self.flops,
                "input_bytes": sum(storage_bytes[k] for k in self.inputs)}


@dataclass
class Problem:
    """Everything the solvers need, built once from the graph and its analysis."""

    nodes: list[torch.fx.Node]
    position: dict[torch.fx.Node, int]
    compute: set[torch.fx.Node]
    saved: dict[torch.fx.Node, frozenset[int]]
    storage_bytes: dict[int, int]
    regions: list[tuple[int | None, list[torch.fx.Node]]]  # (block index, compute nodes) in order
    candidates: list[Candidate] = field(default_factory=list)
    baseline_bytes: int = 0
    total_flops: int = 0
    node_cost: dict[torch.fx.Node, float] = field(default_factory=dict)
    total_cost: float = 0.0
    segment_overhead: float = 0.0


@dataclass
class Evaluation:
    """Predicted memory and cost of a plan (a list of disjoint candidates)."""

    retained_bytes: int
    peak_bytes: int
    recompute_flops: int
    recompute_cost: float = 0.0


def compute_nodes(gm: torch.fx.GraphModule, analysis: Analysis) -> set[torch.fx.Node]:
    """Nodes whose output carries tensors that depend on a trainable parameter (or an input that
    requires grad): the nodes autograd records, i.e. the ones worth recomputing."""
    grad: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, str(node.target))
            if isinstance(value, torch.Tensor) and value.requires_grad:
                grad.add(node)
        elif node.op == "placeholder":
            continue
        elif node.op == "call_module" and any(p.requires_grad for p in gm.get_submodule(str(node.target)).parameters()):
            grad.add(node)
        elif node.op != "output" and any(source in grad for source in node.all_input_nodes):
            cost = analysis.costs.get(node.name)
            if cost is not None and cost.output_bytes > 0:
                grad.add(node)
    return {n for n in grad if n.op not in ("get_attr", "placeholder")}


def _attr(gm: torch.fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _is_weight_module(module: torch.nn.Module) -> bool:
    """A module that multiplies by a weight matrix (a rewritten linear: ``LoraLinear``, a low-rank pair, a
    user's projection module): it holds a parameter or buffer of two or more dimensions and is no lookup table."""
    if any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) for m in module.modules()):  # itself included
        return False
    return any(t.dim() >= 2 for t in (*module.parameters(), *module.buffers()))


def save_nodes(gm: torch.fx.GraphModule, classes: Iterable[str]) -> set[torch.fx.Node]:
    """Nodes of the ``save`` op classes: the boundaries of fine-grained segments."""
    classes = set(classes)
    chosen: set[torch.fx.Node] = set()
    if "matmul" in classes:
        chosen.update(site.node for site in find_linears(gm))
        chosen.update(n for n in gm.graph.nodes if n.op == "call_module" and _is_weight_module(gm.get_submodule(str(n.target))))
        chosen.update(n for n in gm.graph.nodes if (n.op == "call_function" and n.target in MATMUL_TARGETS)
                      or (n.op == "call_method" and n.target in ("matmul", "bmm", "mm")))
    if "attention" in classes:
        for site in find_attention(gm):
            chosen.add(site.node)
    # Fused ops other passes installed say their class (``effcompile_op_class``: norm, elementwise, loss_head);
    # a fused loss head (its gradients are computed in its forward) is never recomputed.
    chosen.update(n for n in gm.graph.nodes if n.op == "call_function" and
                  getattr(n.target, "effcompile_op_class", None) in classes | {"loss_head"})
    if "norm" in classes:
        chosen.update(n for n in gm.graph.nodes if (n.op == "call_function" and n.target in NORM_TARGETS)
                      or (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)),
                                                               (torch.nn.LayerNorm, torch.nn.GroupNorm))))
    return chosen


FLOPS_PER_BYTE = 200.0  # ~ bf16 tensor-core FLOP/s ÷ HBM bytes/s on an H100/H200
SEGMENT_OVERHEAD_SHARE = 0.002  # per checkpointed segment, as a share of the forward's cost


def node_cost(node: torch.fx.Node, analysis: Analysis, cost_model: str) -> float:
    """Recompute cost of one node in FLOP-equivalents (``cost_model`` ``"flops"`` or ``"time"``)."""
    cost = analysis.costs.get(node.name)
    if cost is None:
        return 0.0
    if cost_model == "flops":
        return float(cost.flops)
    sources = set()
    for source in node.all_input_nodes:
        if source.name in analysis.costs:
            sources.update(analysis.costs[source.name].output_storages)
    fresh = [k for k in cost.output_storages if k not in sources]  # views write nothing
    written = sum(analysis.storage_bytes[k] for k in fresh)
    if not fresh:
        return 0.0
    return max(float(cost.flops), FLOPS_PER_BYTE * 2 * written)


def build_problem(gm: torch.fx.GraphModule, analysis: Analysis, cost_model: str = "time") -> Problem:
    """Graph order, compute nodes, per-node saved storages and the block regions."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    compute = compute_nodes(gm, analysis)
    saved = {n: frozenset(analysis.costs[n.name].saved_storages) if n.name in analysis.costs else frozenset()
             for n in nodes}
    regions: list[tuple[int | None, list[torch.fx.Node]]] = []
    for node in nodes:
        if node not in compute:
            continue
        block = block_index(module_path(node))
        if regions and regions[-1][0] == block:
            regions[-1][1].append(node)
        else:
            regions.append((block, [node]))
    problem = Problem(nodes, position, compute, saved, dict(analysis.storage_bytes), regions)
    problem.baseline_bytes = sum(problem.storage_bytes[k] for k in set().union(*saved.values()))
    problem.total_flops = sum(analysis.costs[n.name].flops for n in compute)
    problem.node_cost = {n: node_cost(n, analysis, cost_model) for n in compute}
    problem.total_cost = sum(problem.node_cost.values())
    problem.segment_overhead = SEGMENT_OVERHEAD_SHARE * problem.total_cost if cost_model == "time" else 0.0
    return problem


def make_candidate(problem: Problem, analysis: Analysis, compute_run: Sequence[torch.fx.Node], label: str,
                   kind: str, region: int) -> Candidate | None:
    """A candidate over the graph range from the first to the last node of ``compute_run``."""
    start, end = problem.position[compute_run[0]], problem.position[compute_run[-1]]
    members = segment_members(problem.nodes[start:end + 1], problem.compute)
    if not members:
        return None
    member_set = set(members)
    inputs: set[int] = set()
    for node in members:
        for source in node.all_input_nodes:
            if source not in member_set and source.name in analysis.costs:
                inputs.update(analysis.costs[source.name].output_storages)
    internal = set().union(*(problem.saved[n] for n in members)) - inputs
    flops = sum(analysis.costs[n.name].flops for n in members if n.name in analysis.costs)
    cost = sum(problem.node_cost.get(n, 0.0) for n in members) + problem.segment_overhead
    return Candidate(label, kind, region, members, problem.position[members[0]], problem.position[members[-1]],
                     flops, cost, frozenset(inputs), frozenset(internal))


def region_label(block: int | None, region: int, problem: Problem) -> str:
    """``block 3``, or ``embeddings``/``head`` for the compute outside the repeated blocks."""
    if block is not None:
        return f"block {block}"
    seen_block = any(b is not None for b, _ in problem.regions[:region])
    return "head" if seen_block else "embeddings"


def region_units(run: Sequence[torch.fx.Node], saved_ops: set[torch.fx.Node]) -> list[list[torch.fx.Node]]:
    """``run`` cut into units: each op of ``saved_ops`` alone, and the maximal runs between them."""
    units: list[list[torch.fx.Node]] = []
    for node in run:
        if node in saved_ops:
            units.append([node])
            units.append([])
        elif units and units[-1] and units[-1][-1] in saved_ops:
            units.append([node])
        else:
            if not units:
                units.append([])
            units[-1].append(node)
    return [u for u in units if u]


MAX_RANGE_CANDIDATES = 6000  # beyond this only fine runs and whole regions are offered


def budget_candidates(problem: Problem, analysis: Analysis, saved_ops: set[torch.fx.Node]) -> list[Candidate]:
    """Per region, over its units (fine runs between saved ops, and the saved ops): each fine run alone
    (recomputes only cheap ops), the whole region, and every prefix and suffix of it (a part-block
    segment: less recomputed, a smaller transient in backward). Graphs with over
    ``MAX_RANGE_CANDIDATES`` such ranges get only fine runs and whole regions. (All O(U²) ranges
    multiply the plans per region for little gain.)"""
    per_region = [region_units(run, saved_ops) for _, run in problem.regions]
    ranges = sum(2 * len(u) for u in per_region)
    candidates: list[Candidate] = []
    for region, ((block, _), units) in enumerate(zip(problem.regions, per_region)):
        label = region_label(block, region, problem)
        is_fine = [not (len(u) == 1 and u[0] in saved_ops) for u in units]
        last = len(units) - 1
        spans = [(i, i) for i in range(len(units)) if is_fine[i]] + [(0, last)]
        if ranges <= MAX_RANGE_CANDIDATES:
            spans += [(0, j) for j in range(last)] + [(i, last) for i in range(1, len(units))]
        for i, j in dict.fromkeys(spans):
            if i == j and not is_fine[i]:
                continue  # a saved op alone: its input is kept either way
            whole = i == 0 and j == len(units) - 1
            kind = "block" if whole else ("fine" if i == j else "range")
            name = label if whole else f"{label} units {i + 1}-{j + 1}/{len(units)}"
            nodes = [n for u in units[i:j + 1] for n in u]
            candidate = make_candidate(problem, analysis, nodes, name, kind, region)
            if candidate is not None:
                candidates.append(candidate)
    return candidates


def blocks_plan(problem: Problem, analysis: Analysis) -> list[Candidate]:
    """One segment per repeated block (the usual hand placement)."""
    plan = []
    for region, (block, run) in enumerate(problem.regions):
        if block is not None:
            candidate = make_candidate(problem, analysis, run, f"block {block}", "block", region)
            if candidate is not None:
                plan.append(candidate)
    return plan


def sqrt_plan(problem: Problem, analysis: Analysis) -> list[Candidate]:
    """Chen et al. (2016): ⌈√n⌉ segments of ⌈√n⌉ consecutive blocks each; without repeated blocks, the
    chain of compute nodes cut into ⌈√n⌉ equal pieces."""
    block_regions = [(i, b, run) for i, (b, run) in enumerate(problem.regions) if b is not None]
    plan = []
    if block_regions:
        size = math.ceil(math.sqrt(len(block_regions)))
        for first in range(0, len(block_regions), size):
            group = block_regions[first:first + size]
            run = [n for _, _, r in group for n in r]
            # Regions between the grouped blocks (rare) join the group: the range is contiguous anyway.
            label = f"blocks {group[0][1]}-{group[-1][1]}" if len(group) > 1 else f"block {group[0][1]}"
            candidate = make_candidate(problem, analysis, run, label, "group", group[0][0])
            if candidate is not None:
                plan.append(candidate)
        return plan
    chain = [n for _, run in problem.regions for n in run]
    if len(chain) < 4:
        return []
    size = math.ceil(math.sqrt(len(chain)))
    for number, first in enumerate(range(0, len(chain), size)):
        candidate = make_candidate(problem, analysis, chain[first:first + size], f"piece {number + 1}", "group", 0)
        if candidate is not None:
            plan.append(candidate)
    return plan


def evaluate(problem: Problem, plan: Sequence[Candidate]) -> Evaluation:
    """Predicted retained bytes, peak bytes and recompute FLOPs of ``plan`` (disjoint candidates)."""
    covered = {n for c in plan for n in c.members}
    first_use: dict[int, int] = {}
    for node in problem.nodes:
        if node in covered:
            continue
        for k in problem.saved[node]:
            first_use[k] = min(first_use.get(k, 1 << 62), problem.position[node])
    for candidate in plan:
        for k in candidate.inputs:
            first_use[k] = min(first_use.get(k, 1 << 62), candidate.start)
    retained = sum(problem.storage_bytes[k] for k in first_use)
    peak = retained
    for candidate in plan:
        alive = sum(problem.storage_bytes[k] for k, p in first_use.items() if p <= candidate.start)
        recomputed = sum(problem.storage_bytes[k] for k in candidate.internal if k not in first_use or
                         first_use[k] > candidate.start)
        peak = max(peak, alive + recomputed)
    return Evaluation(retained, peak, sum(c.flops for c in plan), sum(c.cost for c in plan))


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
    """One plan for one region: which of its candidates, the bytes it keeps of the region's own
    storages, its largest recompute transient and its recomputed FLOPs."""

    chosen: tuple[int, ...]
    kept_bytes: int
    transient_bytes: int
    cost: float


MAX_REGION_PLANS = 50_000
DP_BUCKETS = 4000


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
                                     sum(candidates[i].cost for i in chosen)))
    return options


def _region_signature(problem: Problem, candidates: Sequence[Candidate], local: dict[int, int]) -> tuple:
    """Equal for regions with the same structure (repeated blocks), so their options are computed once."""
    if not candidates:
        return ()
    base = min(c.start for c in candidates)
    storage_index: dict[int, int] = {}

    def name(k: int) -> tuple:
        return (storage_index.setdefault(k, len(storage_index)), problem.storage_bytes[k], k in local)

    parts = []
    for c in candidates:
        saved = tuple(tuple(name(k) for k in sorted(problem.saved[n])) for n in c.members)
        parts.append((c.start - base, c.end - base, c.cost, saved, tuple(name(k) for k in sorted(c.inputs)),
                      tuple(name(k) for k in sorted(c.internal))))
    return tuple(parts)


def solve_dp(problem: Problem, candidates: Sequence[Candidate], budget_bytes: float | None,
             ) -> tuple[list[Candidate] | None, str, int]:
    """Exact plan (within the model below) by per-region enumeration and a knapsack over regions.

    Model: kept bytes = storages shared by several regions (always counted) + each region's own kept
    storages; peak ≤ kept + the largest recompute transient (an upper bound of ``evaluate``'s peak).
    For each transient cap T, a knapsack over regions (memory in ``DP_BUCKETS`` steps, rounded up)
    minimises FLOPs with kept ≤ budget − T. Identical regions (repeated blocks) are enumerated once.
    Returns (plan or None, status, smallest reachable peak in bytes under this model)."""
    by_region: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_region.setdefault(candidate.region, []).append(candidate)
    owners: dict[int, set[int]] = {}
    region_of = {n: c.region for c in candidates for n in c.members}
    for node in problem.nodes:
        for k in problem.saved[node]:
            owners.setdefault(k, set()).add(region_of.get(node, -1))
    for candidate in candidates:
        for k in candidate.inputs:
            owners.setdefault(k, set()).add(candidate.region)
    shared = sum(problem.storage_bytes[k] for k, regions in owners.items() if len(regions) > 1 or -1 in regions)
    options_by_region: dict[int, list[_RegionOption]] = {}
    cache: dict[tuple, list[_RegionOption]] = {}
    for region, members in by_region.items():
        local = {k: problem.storage_bytes[k] for k, regions in owners.items() if regions == {region}}
        signature = _region_signature(problem, members, local)
        if signature not in cache:
            options = _region_options(problem, members, local)
            if options is None:
                return None, "too many region plans", 0
            cache[signature] = options
        options_by_region[region] = cache[signature]
    regions = sorted(options_by_region)
    frontier = {r: _pareto(options_by_region[r]) for r in regions}
    unit = max(problem.baseline_bytes, 1) / DP_BUCKETS

    def knapsack(budget: float) -> tuple[float, list[Candidate]] | None:
        buckets = int((budget - shared) // unit)
        if buckets < 0:
            return None
        buckets = min(buckets, 4 * DP_BUCKETS)
        table = np.full(buckets + 1, np.inf)  # least FLOPs with the regions so far keeping exactly m buckets
        table[0] = 0.0
        picks: list[np.ndarray] = []
        for region in regions:
            new = np.full(buckets + 1, np.inf)
            pick = np.full(buckets + 1, -1)
            for i, option in enumerate(frontier[region]):
                need = math.ceil(option.kept_bytes / unit - 1e-9)
                # Recomputing this region's segments happens while everything kept up to here is held.
                limit = buckets - math.ceil(option.transient_bytes / unit - 1e-9)
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
        flops = float(table[m])
        plan: list[Candidate] = []
        for position in range(len(regions) - 1, -1, -1):
            region = regions[position]
            option = frontier[region][int(picks[position][m])]
            plan.extend(by_region[region][i] for i in option.chosen)
            m -= math.ceil(option.kept_bytes / unit - 1e-9)
        return flops, sorted(plan, key=lambda c: c.start)

    if budget_bytes is None:
        low, high = shared, float(problem.baseline_bytes) * 1.5 + shared
        if knapsack(high) is None:
            return None, "smallest", int(high)
        for _ in range(30):  # bisection on the budget: feasibility is monotone
            middle = (low + high) / 2
            low, high = (low, middle) if knapsack(middle) is not None else (middle, high)
            if high - low < unit:
                break
        return None, "smallest", math.ceil(high)
    solved = knapsack(budget_bytes)
    if solved is None:
        return None, "infeasible", 0
    return solved[1], "dp", 0


def _pareto(options: Sequence[_RegionOption]) -> list[_RegionOption]:
    """Options not dominated in (kept bytes, transient, FLOPs)."""
    kept: list[_RegionOption] = []
    for option in sorted(options, key=lambda o: (o.cost, o.kept_bytes, o.transient_bytes)):
        if not any(k.kept_bytes <= option.kept_bytes and k.transient_bytes <= option.transient_bytes
                   for k in kept):
            kept.append(option)
    return kept


def optimise(problem: Problem, candidates: Sequence[Candidate], budget_bytes: float) -> tuple[list[Candidate] | None, str]:
    """The cheapest plan whose predicted peak fits ``budget_bytes``: the region DP, else (a region with
    too many plans) the greedy fallback. None when nothing fits."""
    plan, status, _ = solve_dp(problem, candidates, budget_bytes)
    if plan is not None:
        if evaluate(problem, plan).peak_bytes <= budget_bytes:
            return plan, "dp"
    if status == "infeasible":
        return None, "dp"
    plan = solve_greedy(problem, candidates, budget_bytes)
    fits = evaluate(problem, plan).peak_bytes <= budget_bytes
    return (plan if fits else None), "greedy"


def smallest_peak(problem: Problem, candidates: Sequence[Candidate]) -> int:
    """The smallest predicted peak (bytes) the solvers reach over ``candidates``: a budget at least
    this large is met."""
    _, status, smallest = solve_dp(problem, candidates, None)
    if status == "too many region plans":
        return evaluate(problem, solve_greedy(problem, candidates, None)).peak_bytes
    return smallest
