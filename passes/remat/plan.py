"""Planning for ``remat``: candidate segments and the memory model of a plan (the solvers are in ``solve``).

Memory model (all from ``effcompile.analysis``, storages counted once, parameters never):
  * retained bytes = storages saved for backward by nodes outside every checkpointed segment, plus the
    tensor inputs of every checkpointed segment (non-reentrant checkpoint saves those);
  * peak bytes = max(retained, max over segments s of [retained storages first used at or before s's
    start + what s's recomputation saves]) — during backward, segment s is recomputed while the
    activations of everything before it are still held.
Recompute cost (what the solvers minimise), per node, in FLOP-equivalents, from the one cost model
(``effcompile.analysis``, on a ``DeviceProfile``):
  * ``cost="flops"``: forward FLOPs (matmul/attention counted, other ops one per output element);
  * ``cost="time"`` (default): the roofline estimate ``node_time_cost``, max(FLOPs, ridge × bytes the op
    writes and reads back) — elementwise ops are memory-bound, and in eager mode a chain of them costs
    about as much as the block's matmuls — plus ``segment_overhead_cost`` per segment (each checkpoint
    call has a fixed Python/dispatch cost, so fewer, larger segments are preferred when they save as
    much). Views cost nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from effcompile.analysis import (
    DEFAULT_ACCELERATOR,
    DEVICE_PROFILES,
    Analysis,
    DeviceProfile,
    node_recompute_cost,
    node_time_cost,
    segment_overhead_cost,
)
from effcompile.graph import block_index, get_attr_value, module_path
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
    node_time: dict[torch.fx.Node, float] = field(default_factory=dict)  # forward time, FLOP-equivalents
    profile: DeviceProfile | None = None


@dataclass
class Evaluation:
    """Predicted memory and cost of a plan (a list of disjoint candidates)."""

    retained_bytes: int  # on the device at the forward's end
    peak_bytes: int
    recompute_flops: int
    recompute_cost: float = 0.0
    offloaded_bytes: int = 0  # in pinned host memory at the forward's end


def compute_nodes(gm: torch.fx.GraphModule, analysis: Analysis) -> set[torch.fx.Node]:
    """Nodes whose output carries tensors that depend on a trainable parameter (or an input that
    requires grad): the nodes autograd records, i.e. the ones worth recomputing."""
    grad: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr_value(gm, str(node.target), None)
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


def build_problem(gm: torch.fx.GraphModule, analysis: Analysis, cost_model: str = "time",
                  profile: DeviceProfile | None = None) -> Problem:
    """Graph order, compute nodes, per-node saved storages, the block regions and per-node costs
    (``cost_model`` ``"time"`` or ``"flops"``, FLOP-equivalents on ``profile``, default the H200's)."""
    profile = profile or DEVICE_PROFILES[DEFAULT_ACCELERATOR]
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
    problem.total_flops = counted_flops(analysis, compute)
    problem.node_cost = {n: node_recompute_cost(n, analysis, cost_model, profile) for n in compute}
    problem.total_cost = sum(problem.node_cost.values())
    problem.segment_overhead = segment_overhead_cost(problem.total_cost, profile) if cost_model == "time" else 0.0
    problem.node_time = {n: node_time_cost(n, analysis, profile) for n in compute}
    problem.profile = profile
    return problem


def counted_flops(analysis: Analysis, nodes: Sequence[torch.fx.Node] | set[torch.fx.Node]) -> int:
    """Forward FLOPs of ``nodes`` as the report's FLOPs count them (``FlopCounterMode``'s ops; the cost
    model's one-per-element proxies left out), so a plan's recomputed share reads against the header's."""
    return sum(analysis.costs[n.name].flops for n in nodes
               if n.name in analysis.costs and not analysis.costs[n.name].estimated)


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
    flops = counted_flops(analysis, members)
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


def evaluate(problem: Problem, plan: Sequence[Candidate], offloaded: Mapping[int, int] | None = None) -> Evaluation:
    """Predicted retained bytes, peak bytes and recompute FLOPs of ``plan`` (disjoint candidates), with the
    storages in ``offloaded`` (storage id → the region, an index of ``problem.regions``, whose backward
    uses it) copied to host memory after the forward produced them.

    An offloaded storage is on the device while its region's backward runs and while the backward of the
    region after it runs (its prefetch); during the forward its copy finishes within the next region's
    forward, so at the forward's end only kept storages are on the device."""
    offloaded = offloaded or {}
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
    on_host = {k: r for k, r in offloaded.items() if k in first_use}
    host_by_region: dict[int, int] = {}
    for k, region in on_host.items():
        host_by_region[region] = host_by_region.get(region, 0) + problem.storage_bytes[k]

    def prefetched(region: int) -> int:  # this region's offloaded storages and the previous one's, fetched back
        return host_by_region.get(region, 0) + host_by_region.get(region - 1, 0)

    def alive(position: int) -> int:
        return sum(problem.storage_bytes[k] for k, p in first_use.items() if p <= position and k not in on_host)

    retained = sum(problem.storage_bytes[k] for k in first_use if k not in on_host)
    peak = retained
    for candidate in plan:
        recomputed = sum(problem.storage_bytes[k] for k in candidate.internal if k not in first_use or
                         first_use[k] > candidate.start)
        extra = prefetched(candidate.region) if on_host else 0
        peak = max(peak, alive(candidate.start) + recomputed + extra)
    for region in sorted({r for r in host_by_region} | {r + 1 for r in host_by_region}):
        if 0 <= region < len(problem.regions):
            end = problem.position[problem.regions[region][1][-1]]
            peak = max(peak, alive(end) + prefetched(region))
    return Evaluation(retained, peak, sum(c.flops for c in plan), sum(c.cost for c in plan),
                      sum(host_by_region.values()))
