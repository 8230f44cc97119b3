"""``pipeline``: cut the captured graph into K cost-balanced pipeline stages.

1. Cost every compute node (``balance``: forward FLOPs, parameter elements, memory — saved activation
   bytes plus 4x parameter bytes for weights, gradients and two Adam moments — or measured seconds).
2. At every place between two compute nodes (in graph order) list the values that cross it. A value that
   depends on no model input and no trainable parameter (attention masks, rotary tables, sizes) is
   recomputed inside the stage that needs it instead of being sent; ``aten.sym_size`` of a tensor the
   stage does not have is re-read from a received activation with the same symbolic size. Model inputs
   are fed to the stages that read them, never sent. A place is *cuttable* when everything else that
   crosses it is a floating-point tensor (what ``torch.distributed.pipelining`` can send); its cost is
   the bytes of those tensors.
3. Solve the contiguous partition exactly (``_pipeline_partition``): the smallest largest-stage cost,
   then, within ``cut_slack`` of it, the fewest bytes sent.
4. Emit one GraphModule per stage (inputs: the activations received, then the model inputs it reads;
   outputs: the activations it sends, or for the last stage the model's flat outputs) and replace the
   program's module by one that calls the stages in order, so verification checks the composition.
   Parameters keep their names: the composed module holds the original attribute tree first and each
   stage refers to the same tensors. A parameter read by two stages (tied embeddings) is reported; with
   ``tied=replicate`` each stage keeps a copy and the runtime sums their gradients across those ranks.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from effcompile.analysis import (
    Analysis,
    analyze,
    measure_node_seconds,
    node_parameter_costs,
    node_training_memory,
    to_networkx,
)
from effcompile.errors import OptionError, PassError
from effcompile.graph import finalize, get_attr_value, module_path
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.plans import PipelinePlan, TiedParameter
from effcompile.program import Program, loss_field

from .partition import solve

log = logging.getLogger(__name__)

STAGE_PREFIX = "pipeline_stage"
COMPUTE_OPS = ("call_function", "call_method", "call_module")
_RANDOM_MARKERS = ("dropout", "rand", "bernoulli", "normal", "uniform", "multinomial", "exponential",
                   "cauchy", "geometric", "poisson")


@register
class Pipeline(Pass):
    """Split the graph into K contiguous stages with balanced cost and light cuts."""

    name = "pipeline"
    summary = "cut the graph into K cost-balanced pipeline stages for torch.distributed.pipelining"
    exact = True
    last = True  # the stages are the program handed to the pipeline runtime

    @dataclass(frozen=True)
    class Config:
        stages: int = field(default=2, metadata={"help": "number of pipeline stages K (>= 1)"})
        balance: Literal["flops", "params", "memory", "time"] = field(
            default="flops", metadata={"help": "stage cost to balance: forward FLOPs, parameters, memory "
                                               "(activations + 4x parameter bytes) or measured time"})
        microbatches: int = field(default=8, metadata={"help": "micro-batches per step (for the runtime and "
                                                              "the bubble estimate)"})
        schedule: Literal["gpipe", "1f1b", "interleaved"] = field(
            default="1f1b", metadata={"help": "torch.distributed.pipelining schedule"})
        stages_per_rank: int = field(default=2, metadata={"help": "interleaved only: stages held by each rank"})
        cut_slack: float = field(default=0.05, metadata={
            "help": "a stage may cost this fraction more than the best balance if the cuts then send fewer bytes"})
        tied: Literal["replicate", "refuse"] = field(default="replicate", metadata={
            "help": "a parameter read by two stages (tied embeddings): keep a copy on each and sum their "
                    "gradients, or refuse"})
        split_before: tuple[str, ...] = field(default=(), metadata={
            "help": "manual cuts instead of the solver: K-1 module paths (cut before the first node of that "
                    "module, e.g. transformer.h.12) or node names"})

        def __post_init__(self) -> None:
            if self.stages < 1:
                raise OptionError(f"pipeline: stages={self.stages} must be at least 1; set --set pipeline.stages=2")
            if self.microbatches < 1:
                raise OptionError(f"pipeline: microbatches={self.microbatches} must be at least 1; "
                                  "set e.g. --set pipeline.microbatches=8")
            if not (0 <= self.cut_slack < math.inf):
                raise OptionError(f"pipeline: cut_slack={self.cut_slack} must be a finite number >= 0; use e.g. 0.05")
            if self.stages_per_rank < 1:
                raise OptionError(f"pipeline: stages_per_rank={self.stages_per_rank} must be at least 1; "
                                  "set e.g. --set pipeline.stages_per_rank=2")
            if self.schedule == "interleaved":
                if self.stages_per_rank < 2 or self.stages % self.stages_per_rank:
                    raise OptionError(f"pipeline: schedule=interleaved needs stages_per_rank >= 2 dividing "
                                      f"stages={self.stages} (got {self.stages_per_rank}); e.g. stages=4, "
                                      "stages_per_rank=2")
            if self.split_before and len(self.split_before) != self.stages - 1:
                raise OptionError(f"pipeline: split_before names {len(self.split_before)} cuts but stages="
                                  f"{self.stages} needs {self.stages - 1}; give one module path per cut")

    def requires(self, program: Program, config: Config) -> None:
        if any(n.op == "call_module" and str(n.target).startswith(STAGE_PREFIX) for n in program.gm.graph.nodes):
            raise PassError("pipeline: the program is already split into stages; run the pass once")

    def ensures(self, program: Program, config: Config, record: PassRecord) -> None:
        program.gm.graph.lint()
        plan = program.plan(PipelinePlan)
        for stage in plan.modules if plan is not None else []:
            stage.graph.lint()

    def call(self, program: Program, config: Config) -> PassRecord:
        analysis = analyze(program)
        seconds = measure_node_seconds(program) if config.balance == "time" else None
        layout = _Layout(program, analysis)
        node_costs = layout.node_costs(config.balance, seconds)
        cut_positions = _choose_cuts(layout, node_costs, config)
        built = _build_stages(program, layout, cut_positions)
        tied = _tied_parameters(program.gm, built.stage_modules)
        if tied and config.tied == "refuse":
            first = tied[0]
            raise PassError(f"pipeline: parameter {first['parameter']} is read by stages {first['stages']} "
                            "(tied weights); set pipeline.tied=replicate to keep a copy on each stage and sum "
                            "their gradients, or untie them in the model")
        plan = _plan(program, layout, built, config, tied)
        program.gm = built.top
        program.set_plan(plan)
        details = _report(layout, analysis, built, node_costs, cut_positions, config, tied, seconds)
        details["plan"] = plan.to_dict()
        stats = {"stages": config.stages, "imbalance": details["imbalance"],
                 "bubble_fraction": details["bubble_fraction"],
                 "max_cut_bytes": max((c["bytes"] for c in details["cuts"]), default=0)}
        log.info("pipeline: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats=stats, details=details)


# --------------------------------------------------------------------------------------------- layout


class _Layout:
    """The compute nodes in order, what each value is, and what crosses each place a cut could go.

    Position ``q`` (1..n-1) is the place between ``sequence[q-1]`` and ``sequence[q]``.
    """

    def __init__(self, program: Program, analysis: Analysis) -> None:
        self.gm = program.gm
        self.analysis = analysis
        nodes = list(self.gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = next(n for n in nodes if n.op == "output")
        self.sequence = [n for n in nodes if n.op in COMPUTE_OPS]
        if not self.sequence:
            raise PassError("pipeline: the graph has no compute node to place in a stage")
        self.position = {n: i for i, n in enumerate(self.sequence)}
        self.count = len(self.sequence)
        self._recomputable: dict[torch.fx.Node, bool] = {}
        self._symbols: dict[torch.fx.Node, frozenset[str]] = {}
        self._analyse_places()

    # what a value is
    def is_tensor(self, node: torch.fx.Node) -> bool:
        return "effcompile_shape" in node.meta

    def is_float(self, node: torch.fx.Node) -> bool:
        dtype = node.meta.get("effcompile_dtype")
        return dtype is not None and dtype.is_floating_point

    def bytes_of(self, node: torch.fx.Node) -> int:
        cost = self.analysis.costs.get(node.name)
        return cost.output_bytes if cost is not None else 0

    def trainable(self, node: torch.fx.Node) -> bool:
        if node.op != "get_attr":
            return False
        value = get_attr_value(self.gm, str(node.target))
        return isinstance(value, torch.nn.Parameter) and value.requires_grad

    def recomputable(self, node: torch.fx.Node) -> bool:
        """True when ``node`` can be recomputed in any stage: a deterministic function/method of
        buffers, constants, sizes and other recomputable values (never of a model input or a trainable
        parameter, except for reading a size)."""
        if node in self._recomputable:
            return self._recomputable[node]
        self._recomputable[node] = False  # cycles cannot happen in a DAG; this guards recursion
        ok = node.op in ("call_function", "call_method") and not _is_random_or_mutating(node)
        symbols: set[str] = set()
        if ok and _is_sym_size(node):
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and self.recomputable(source):
                symbols |= self._symbols.get(source, frozenset())
            else:
                symbol = _symbol(node.meta.get("val"))
                ok = symbol is not None
                if ok:
                    symbols.add(symbol)
        elif ok:
            for source in node.all_input_nodes:
                if source.op == "get_attr" and not self.trainable(source):
                    continue
                if self.recomputable(source):
                    symbols |= self._symbols.get(source, frozenset())
                    continue
                ok = False
                break
        self._recomputable[node] = ok
        self._symbols[node] = frozenset(symbols)
        return ok

    def last_use(self, node: torch.fx.Node) -> int:
        uses = [self.position[u] if u in self.position else self.count for u in node.users if u.op != "get_attr"]
        return max(uses, default=-1)

    def _analyse_places(self) -> None:
        """For each position: bytes sent, the float tensors sent, and the reason it cannot be cut."""
        n = self.count
        starts: dict[int, list[torch.fx.Node]] = {}
        for node in self.sequence:
            last = self.last_use(node)
            if last > self.position[node]:
                starts.setdefault(self.position[node] + 1, []).append(node)
        self.sent: list[list[torch.fx.Node]] = [[] for _ in range(n)]
        self.sent_bytes: list[int] = [0] * n
        self.blocked: list[str | None] = [None] * n
        live: list[torch.fx.Node] = []
        for q in range(1, n):
            live = [v for v in live if self.last_use(v) >= q] + starts.get(q, [])
            needed_symbols: dict[str, str] = {}
            for value in live:
                if self.recomputable(value):
                    for symbol in self._symbols.get(value, frozenset()):
                        needed_symbols.setdefault(symbol, value.name)
                    continue
                if self.is_tensor(value) and self.is_float(value):
                    self.sent[q].append(value)
                    self.sent_bytes[q] += self.bytes_of(value)
                elif self.blocked[q] is None:
                    kind = f"a {value.meta['effcompile_dtype']} tensor" if self.is_tensor(value) else \
                        f"a {type(value.meta.get('val')).__name__ if 'val' in value.meta else 'non-tensor'} value"
                    self.blocked[q] = (f"{value.name} ({kind}, from {module_path(value) or 'the top level'}) "
                                       "crosses here and only floating-point tensors can be sent")
            if self.blocked[q] is None and needed_symbols:
                available = {s for v in self.sent[q] for s in _tensor_symbols(v)}
                missing = [s for s in needed_symbols if s not in available]
                if missing:
                    self.blocked[q] = (f"{needed_symbols[missing[0]]} needs the size {missing[0]}, which no "
                                       "activation crossing here carries")

    def node_costs(self, balance: str, seconds: dict[str, float] | None) -> list[float]:
        """One cost per compute node in the unit ``balance`` asks for."""
        if balance == "flops":
            return [self.analysis[n].flops for n in self.sequence]
        if balance == "time":
            assert seconds is not None
            return [float(seconds.get(n.name, 0.0)) for n in self.sequence]
        if balance == "params":
            return [elements for elements, _ in node_parameter_costs(self.gm, self.sequence)]
        return list(node_training_memory(self.gm, self.analysis, self.sequence))


def _is_sym_size(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size)


def _is_random_or_mutating(node: torch.fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target)).lower()
    if any(marker in name for marker in _RANDOM_MARKERS):
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _symbol(value: Any) -> str | None:
    if isinstance(value, torch.SymInt):
        return str(value.node.expr)
    return None


def _tensor_symbols(node: torch.fx.Node) -> list[str]:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return []
    return [s for s in (_symbol(d) for d in value.shape) if s is not None]


# --------------------------------------------------------------------------------------------- cuts


def _choose_cuts(layout: _Layout, node_costs: list[float], config: Pipeline.Config) -> list[int]:
    """Positions (1..n-1) of the K-1 cuts: from ``split_before`` or the exact solver."""
    k = config.stages
    allowed = [q for q in range(1, layout.count) if layout.blocked[q] is None]
    if config.split_before:
        positions = []
        for name in config.split_before:
            q = _position_of(layout, name)
            if layout.blocked[q] is not None:
                raise PassError(f"pipeline: cannot cut before {name!r}: {layout.blocked[q]}; choose another "
                                "module path")
            positions.append(q)
        if positions != sorted(set(positions)):
            raise PassError(f"pipeline: split_before {list(config.split_before)} must name distinct places in "
                            "graph order")
        return positions
    if k - 1 > len(allowed):
        raise PassError(_too_few_cuts_message(layout, k, allowed))
    bounds = [0] + allowed + [layout.count]
    unit_costs = [sum(node_costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    unit_bytes = [0] + [layout.sent_bytes[q] for q in allowed]
    partition = solve(unit_costs, k, unit_bytes, config.cut_slack)
    return [bounds[s] for s in partition.starts[1:]]


def _position_of(layout: _Layout, name: str) -> int:
    for node in layout.sequence:
        path = module_path(node)
        if node.name == name or path == name or path.startswith(name + "."):
            q = layout.position[node]
            if q == 0:
                raise PassError(f"pipeline: split_before {name!r} is the first node; the first stage would be empty")
            return q
    raise PassError(f"pipeline: split_before {name!r} matches no node or module path; name a module such as "
                    f"{module_path(layout.sequence[len(layout.sequence) // 2]) or layout.sequence[1].name!r}")


def _too_few_cuts_message(layout: _Layout, stages: int, allowed: list[int]) -> str:
    reasons = Counter(r for r in layout.blocked[1:] if r is not None)
    where = "; ".join(f"{count} places: {reason}" for reason, count in reasons.most_common(2))
    return (f"pipeline: stages={stages} needs {stages - 1} cuts but only {len(allowed)} of {layout.count - 1} "
            f"places between nodes can be cut ({where or 'the graph has too few nodes'}); lower pipeline.stages")


# --------------------------------------------------------------------------------------------- stages


@dataclass
class _Built:
    top: torch.fx.GraphModule
    stage_modules: list[torch.fx.GraphModule]
    ranges: list[tuple[int, int]]
    inputs: list[list[str]]
    direct_inputs: list[list[str]]
    outputs: list[list[str]]
    recomputed: list[list[str]]


def _build_stages(program: Program, layout: _Layout, cuts: list[int]) -> _Built:
    gm = program.gm
    bounds = [0] + cuts + [layout.count]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    output_leaves = [leaf for leaf in pytree.tree_leaves(layout.output.args[0]) if isinstance(leaf, torch.fx.Node)]
    modules, inputs, directs, outputs, recomputed = [], [], [], [], []
    for index, (start, end) in enumerate(ranges):
        last = index == len(ranges) - 1
        received = layout.sent[start] if index else []
        sends = output_leaves if last else layout.sent[end]
        direct = _direct_inputs(layout, start, end, output_leaves if last else [])
        stage, redone = _stage_module(gm, layout, start, end, received, direct, sends)
        stage.train(gm.training)
        modules.append(stage)
        inputs.append([v.name for v in received])
        directs.append([p.name for p in direct])
        outputs.append([v.name for v in sends])
        recomputed.append(redone)
    top = _compose(gm, layout, modules, ranges, output_leaves)
    return _Built(top, modules, ranges, inputs, directs, outputs, recomputed)


def _direct_inputs(layout: _Layout, start: int, end: int, extra: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Model inputs a stage reads itself (they are fed to it, not sent along the pipeline)."""
    stage_nodes = set(layout.sequence[start:end])
    used = {p for p in layout.placeholders if any(u in stage_nodes for u in p.users)}
    used |= {p for p in extra if p.op == "placeholder"}
    return [p for p in layout.placeholders if p in used]


def _stage_module(gm: torch.fx.GraphModule, layout: _Layout, start: int, end: int,
                  received: list[torch.fx.Node], direct: list[torch.fx.Node],
                  sends: list[torch.fx.Node]) -> tuple[torch.fx.GraphModule, list[str]]:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for value in list(received) + list(direct):
        placeholder = graph.placeholder(value.name)
        placeholder.meta = dict(value.meta)
        env[value] = placeholder
    tensor_inputs = [v for v in list(received) + list(direct) if layout.is_tensor(v)]
    redone: list[str] = []

    def lookup(node: torch.fx.Node) -> torch.fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.get_attr(str(node.target))
            env[node].meta = dict(node.meta)
            return env[node]
        if _is_sym_size(node) and isinstance(node.args[0], torch.fx.Node) and node.args[0] not in env \
                and not layout.recomputable(node.args[0]):
            env[node] = _resize_from(graph, env, node, tensor_inputs)
            return env[node]
        if layout.recomputable(node):
            env[node] = graph.node_copy(node, lookup)
            redone.append(node.name)
            return env[node]
        raise PassError(f"pipeline: {node.name} is needed by a stage but neither received nor recomputable; "
                        "this is a bug in the pass, report it")

    for node in layout.sequence[start:end]:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(v) for v in sends))
    stage = torch.fx.GraphModule(gm, graph, class_name="PipelineStage")
    return finalize(stage), redone


def _resize_from(graph: torch.fx.Graph, env: dict, node: torch.fx.Node, tensors: list[torch.fx.Node]) -> torch.fx.Node:
    """``sym_size(x, d)`` of a tensor this stage lacks, read from a received tensor of the same size."""
    symbol = _symbol(node.meta.get("val"))
    for tensor in tensors:
        value = tensor.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if symbol is not None and _symbol(size) == symbol:
                new = graph.call_function(torch.ops.aten.sym_size.int, (env[tensor], dim))
                new.meta = dict(node.meta)
                return new
    raise PassError(f"pipeline: {node.name} reads the size {symbol} of a tensor this stage does not receive "
                    "and no received tensor has that size; this is a bug in the pass, report it")


def _compose(gm: torch.fx.GraphModule, layout: _Layout, stages: list[torch.fx.GraphModule],
             ranges: list[tuple[int, int]], output_leaves: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """A GraphModule with the original signature and output structure that calls the stages in order.

    It first reads every top-level attribute of the original (unused ``get_attr`` nodes), so it owns the
    original attribute tree and parameters keep their original names (optimisers, checkpoints and the
    verifier see the same names; deep copies and saved modules keep them too)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for placeholder in layout.placeholders:
        env[placeholder] = graph.node_copy(placeholder)
    tops = list(gm._modules) + list(gm._parameters) + list(gm._buffers)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in str(node.target) and str(node.target) not in tops:
            tops.append(str(node.target))
    for name in tops:
        graph.get_attr(name)
    root = torch.nn.Module()
    for name in tops:
        value = getattr(gm, name)
        if isinstance(value, torch.nn.Module):
            root.add_module(name, value)
        else:
            setattr(root, name, value)
    for index, stage in enumerate(stages):
        root.add_module(f"{STAGE_PREFIX}{index}", stage)
    by_name = {**{n.name: n for n in layout.sequence}, **{p.name: p for p in layout.placeholders}}
    for index, (stage, (_, end)) in enumerate(zip(stages, ranges)):
        placeholders = [n for n in stage.graph.nodes if n.op == "placeholder"]
        call = graph.call_module(f"{STAGE_PREFIX}{index}", tuple(env[by_name[str(p.target)]] for p in placeholders))
        last = index == len(stages) - 1
        sends = output_leaves if last else layout.sent[end]
        for i, value in enumerate(sends):
            env[value] = graph.call_function(operator.getitem, (call, i))
    graph.node_copy(layout.output, lambda n: env[n])
    graph._codegen = gm.graph._codegen
    top = torch.fx.GraphModule(root, graph, class_name="PipelinedModule")
    top.meta = dict(getattr(gm, "meta", {}))
    top.train(gm.training)
    return top


# --------------------------------------------------------------------------------------------- report


def _tied_parameters(gm: torch.nn.Module, stages: list[torch.fx.GraphModule]) -> list[dict[str, Any]]:
    """Trainable parameters (by identity) that more than one stage reads."""
    names = {id(p): n for n, p in gm.named_parameters()}
    holders: dict[int, list[int]] = {}
    for index, stage in enumerate(stages):
        for parameter in {id(p) for p in stage.parameters() if p.requires_grad}:
            holders.setdefault(parameter, []).append(index)
    return [{"parameter": names.get(pid, "?"), "stages": held} for pid, held in holders.items() if len(held) > 1]


def bubble_fraction(schedule: str, stages: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a pipeline step: (p-1)/(v*M + p-1) for p ranks holding v stages each (v=1 for
    GPipe and 1F1B)."""
    ranks = stages // stages_per_rank if schedule == "interleaved" else stages
    virtual = stages_per_rank if schedule == "interleaved" else 1
    return (ranks - 1) / (virtual * microbatches + ranks - 1)


def _loss_output_index(program: Program, layout: _Layout, output_leaves: list[torch.fx.Node]) -> int | None:
    """Which of the last stage's outputs is the loss (HF models compute it in the graph), or None."""
    if program.loss_fn is not None:
        return None
    interpreter = torch.fx.Interpreter(program.gm, garbage_collect_values=False)
    with torch.no_grad():
        torch.manual_seed(0)
        output = interpreter.run(*program.flat_inputs())
    loss = loss_field(output)
    for index, leaf in enumerate(output_leaves):
        if loss is not None and interpreter.env.get(leaf) is loss:
            return index
    return None


def _plan(program: Program, layout: _Layout, built: _Built, config: Pipeline.Config,
          tied: list[dict[str, Any]]) -> PipelinePlan:
    """What the runtime needs: the stage modules and, per stage, its inputs, direct inputs and outputs."""
    output_leaves = [leaf for leaf in pytree.tree_leaves(layout.output.args[0]) if isinstance(leaf, torch.fx.Node)]
    return PipelinePlan(
        stages=config.stages, schedule=config.schedule, microbatches=config.microbatches,
        stages_per_rank=config.stages_per_rank if config.schedule == "interleaved" else 1,
        modules=list(built.stage_modules), stage_names=[f"{STAGE_PREFIX}{i}" for i in range(config.stages)],
        inputs=built.inputs, direct_inputs=built.direct_inputs, outputs=built.outputs,
        target_inputs=[n for n in built.direct_inputs[-1] if n not in built.direct_inputs[0]],
        first_nodes=[layout.sequence[start].name for start, _ in built.ranges],
        placeholders=[p.name for p in layout.placeholders],
        loss_output_index=_loss_output_index(program, layout, output_leaves),
        tied=[TiedParameter(t["parameter"], list(t["stages"])) for t in tied], capture_path=program.capture_path)


def _report(layout: _Layout, analysis: Analysis, built: _Built, node_costs: list[float], cuts: list[int],
            config: Pipeline.Config, tied: list[dict[str, Any]], seconds: dict[str, float] | None) -> dict[str, Any]:
    graph = to_networkx(layout.gm, analysis)
    stages = []
    for index, ((start, end), module) in enumerate(zip(built.ranges, built.stage_modules)):
        nodes = layout.sequence[start:end]
        paths = [p for p in (module_path(n) for n in nodes) if p and not p.startswith("_empty")]
        stage = {
            "index": index, "nodes": len(nodes), "first_node": nodes[0].name, "last_node": nodes[-1].name,
            "modules": f"{paths[0]} … {paths[-1]}" if paths else "",
            "cost": sum(node_costs[start:end]), "flops": sum(analysis[n].flops for n in nodes),
            "params": sum(p.numel() for p in {id(p): p for p in module.parameters()}.values()),
            "activation_bytes": sum(analysis[n].saved_bytes for n in nodes),
            "inputs": built.inputs[index], "direct_inputs": built.direct_inputs[index],
            "outputs": built.outputs[index] if index < len(built.ranges) - 1 else ["<model outputs>"],
            "recomputed": built.recomputed[index],
        }
        if seconds is not None:
            stage["seconds"] = sum(seconds.get(n.name, 0.0) for n in nodes)
        stages.append(stage)
    costs = [s["cost"] for s in stages]
    mean = sum(costs) / len(costs)
    imbalance = max(costs) / mean if mean > 0 else 1.0
    cut_rows = []
    for q in cuts:
        before, after = layout.sequence[q - 1], layout.sequence[q]
        sent = layout.sent[q]
        # Sanity (and a networkx check of contiguity): no edge runs from a later stage to an earlier one.
        assert not any(graph.has_edge(after.name, v.name) for v in sent)
        cut_rows.append({"after": module_path(before) or before.name, "before": module_path(after) or after.name,
                         "before_node": after.name, "bytes": layout.sent_bytes[q],
                         "tensors": [f"{v.name}{list(analysis[v].shape or ())}" for v in sent]})
    bubble = bubble_fraction(config.schedule, config.stages, config.microbatches,
                             config.stages_per_rank if config.schedule == "interleaved" else 1)
    cuttable = sum(1 for r in layout.blocked[1:] if r is None)
    summary = (f"{config.stages} stages by {config.balance}, imbalance {imbalance:.3f}, "
               f"cuts send {', '.join(_human(c['bytes']) for c in cut_rows) or 'nothing'}, "
               f"{config.schedule} bubble {bubble:.1%} at {config.microbatches} micro-batches"
               + (f", tied {', '.join(t['parameter'] for t in tied)}" if tied else ""))
    return {"summary": summary, "balance": config.balance, "stages": stages, "cuts": cut_rows,
            "imbalance": imbalance, "bubble_fraction": bubble, "schedule": config.schedule,
            "microbatches": config.microbatches, "tied": tied, "cuttable_places": cuttable,
            "places": layout.count - 1, "dag_is_acyclic": nx.is_directed_acyclic_graph(graph),
            "tied_note": ("each stage holding a tied parameter keeps its own copy; the runtime all-reduces "
                          "(sums) their gradients between those ranks after every step") if tied else ""}


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def stage_modules(module: torch.nn.Module) -> list[torch.fx.GraphModule]:
    """The stage GraphModules of a module the ``pipeline`` pass produced, in order."""
    found = []
    while hasattr(module, f"{STAGE_PREFIX}{len(found)}"):
        found.append(getattr(module, f"{STAGE_PREFIX}{len(found)}"))
    return found
