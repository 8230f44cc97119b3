"""Where ``remat`` may offload, and the graph rewrite that makes a plan's offloads happen.

Eligible storages (``offload_model``): produced by a graph node (not an input, a parameter or a value made
inside an op, such as autocast's casts), at least ``min_bytes``, not returned by the graph (the caller keeps
those, so offloading them frees nothing), and not read or written by an in-place op (with saved-tensor hooks
autograd no longer checks versions). Each region's copies overlap the forward and the backward of the region
after it (``OffloadModel.windows``, from the roofline).

Rewrite (``insert_offload``, after the segments are extracted): an ``offload_mark`` after the node holding
each offloaded storage, an ``offload_region_end`` after the last node of every region that follows an
offloading region, then everything from the first offloaded storage's producer to the end of the last such
region moves into one ``OffloadedSpan`` (see ``offload``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.utils import _pytree as pytree

from effcompile.analysis import Analysis, DeviceProfile, cost_seconds

from .offload import OffloadedSpan, no_session, offload_mark, offload_region_end
from .plan import Problem
from .segment import extract_subgraph
from .solve import OffloadModel

SPAN_NAME = "remat_offload_span"


def is_offload_span(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """True when ``node`` calls an ``OffloadedSpan``."""
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), OffloadedSpan)


def producers(gm: torch.fx.GraphModule, analysis: Analysis) -> dict[int, torch.fx.Node]:
    """Storage id → the first node whose value is a tensor in that storage (placeholders, parameters and
    buffers excluded: offloading them frees nothing)."""
    found: dict[int, torch.fx.Node] = {}
    inputs: set[int] = set()
    for node in gm.graph.nodes:
        cost = analysis.costs.get(node.name)
        if cost is None:
            continue
        if node.op in ("placeholder", "get_attr"):
            inputs.update(cost.output_storages)
        elif node.op != "output" and cost.shape is not None:
            for k in cost.output_storages:
                found.setdefault(k, node)
    return {k: node for k, node in found.items() if k not in inputs}


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
                       operator.setitem}


def _in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """True when ``node`` may write into one of its inputs."""
    target = node.target
    if node.op == "call_method":
        return str(target).endswith("_") and not str(target).startswith("_")
    if node.op == "call_module":
        return any(getattr(m, "inplace", False) is True for m in gm.get_submodule(str(target)).modules())
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        name = getattr(target, "__name__", "")
        return target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True or \
            (name.endswith("_") and not name.startswith("_"))
    return False


def eligible_storages(gm: torch.fx.GraphModule, analysis: Analysis, min_bytes: float) -> set[int]:
    """Storages ``remat`` may offload (see the module docstring)."""
    found = producers(gm, analysis)
    returned: set[int] = set()
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for leaf in pytree.tree_leaves(output.args):
        if isinstance(leaf, torch.fx.Node) and leaf.name in analysis.costs:
            returned.update(analysis.costs[leaf.name].output_storages)
    touched: set[int] = set()
    for node in gm.graph.nodes:
        if _in_place(gm, node):
            for source in node.all_input_nodes:
                if source.name in analysis.costs:
                    touched.update(analysis.costs[source.name].output_storages)
    return {k for k in found if k not in returned and k not in touched and analysis.storage_bytes[k] >= min_bytes}


def offload_model(problem: Problem, gm: torch.fx.GraphModule, analysis: Analysis, profile: DeviceProfile,
                  link_bytes_per_second: float, min_bytes: float, widen: bool, time_scale: float) -> OffloadModel:
    """The planner's view of offloading on ``profile`` with a host link of ``link_bytes_per_second``: the
    eligible storages, and per region the forward time of the region after it (the device→host window;
    roofline × ``time_scale``, real seconds) and twice that (the host→device window: a backward costs about
    two forwards)."""
    forward = [time_scale * cost_seconds(sum(problem.node_time.get(n, 0.0) for n in run), profile)
               for _, run in problem.regions]
    windows = {r: ((forward[r + 1], 2 * forward[r + 1]) if r + 1 < len(forward) else (0.0, 0.0))
               for r in range(len(forward))}
    return OffloadModel(eligible_storages(gm, analysis, min_bytes), windows, link_bytes_per_second, profile, widen,
                        time_scale)


def _current(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Original node name → the node holding its value now (itself, or a getitem of a segment call)."""
    now: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if "remat_source" not in node.meta:
            now[node.name] = node
    for node in gm.graph.nodes:
        if "remat_source" in node.meta:
            now[node.meta["remat_source"]] = node
    return now


def insert_offload(gm: torch.fx.GraphModule, problem: Problem, analysis: Analysis, offloaded: dict[int, int],
                   ) -> torch.fx.Node | None:
    """Make the offloads of a plan happen (``offloaded``: storage id → region; ``analysis`` of the graph
    before the segments were extracted). Returns the span's call node (None when nothing is offloaded)."""
    if not offloaded:
        return None
    now = _current(gm)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    region_names = [{n.name for n in run} for _, run in problem.regions]
    tensor_names = {name for name, cost in analysis.costs.items() if cost.shape is not None}

    def holder(k: int) -> torch.fx.Node:  # the first node still in the graph whose value lives in storage k
        return next(now[n.name] for n in problem.nodes if n.name in tensor_names and n.name in now
                    and k in analysis.costs[n.name].output_storages and n.op not in ("placeholder", "get_attr"))

    def source(node: torch.fx.Node) -> str:
        return node.meta.get("remat_source", node.name)

    def nodes_of(region: int) -> list[torch.fx.Node]:
        return sorted((node for name, node in now.items() if name in region_names[region] and name in tensor_names),
                      key=position.__getitem__)

    def boundary(region: int) -> tuple[torch.fx.Node, ...]:
        """The region's floating-point values read after it: their gradients arrive as its backward starts."""
        found = [node for node in nodes_of(region)
                 if (analysis.costs[source(node)].dtype or torch.int64).is_floating_point
                 and any(source(user) not in region_names[region] for user in node.users)]
        return tuple(found) or tuple(nodes_of(region)[-1:])

    marks = sorted(((holder(k), region) for k, region in offloaded.items()), key=lambda pair: position[pair[0]])
    ends = sorted({region + 1 for region in offloaded.values() if region + 1 < len(problem.regions)})
    first = marks[0][0]
    if first.op == "call_function" and first.target is operator.getitem:  # the op before it may save its outputs
        first = first.args[0]
    last = max([nodes_of(r)[-1] for r in ends] + [nodes_of(max(offloaded.values()))[-1]], key=position.__getitem__)
    with gm.graph.inserting_before(first):
        session = gm.graph.call_function(no_session, ())
    for value, region in marks:
        with gm.graph.inserting_after(value):
            gm.graph.call_function(offload_mark, (session, value, region))
    for region in ends:
        end = nodes_of(region)[-1]
        with gm.graph.inserting_after(end):
            marker = gm.graph.call_function(offload_region_end, (session, region, boundary(region)))
        if end is last:
            last = marker
    members = []
    node = session.next
    while True:
        if node.op not in ("placeholder", "get_attr", "output"):
            members.append(node)
        if node is last:
            break
        node = node.next
    call = extract_subgraph(gm, members, SPAN_NAME, "RematOffloadSpan",
                            lambda body, inputs: OffloadedSpan(body, inputs.index(session)))
    call.meta["remat_offload_span"] = True
    return call
