"""The stage GraphModules: one per contiguous range of compute nodes (inputs: the activations received,
then the model inputs it reads; outputs: the activations it sends), and the module that calls them in order
(step 4 of the ``pipeline`` pass)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from effcompile.errors import PassError
from effcompile.graph import finalize
from effcompile.program import Program

from .layout import Layout, is_sym_size, size_symbol

STAGE_PREFIX = "pipeline_stage"


@dataclass
class Built:
    """The composed module, the stage modules, and per stage its node range and the names of what it
    receives, reads directly, sends and recomputes."""

    top: torch.fx.GraphModule
    stage_modules: list[torch.fx.GraphModule]
    ranges: list[tuple[int, int]]
    inputs: list[list[str]]
    direct_inputs: list[list[str]]
    outputs: list[list[str]]
    recomputed: list[list[str]]


def build_stages(program: Program, layout: Layout, cuts: list[int]) -> Built:
    """One stage module per range between ``cuts`` (positions in ``layout.sequence``) and the module that
    calls them in order."""
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
    return Built(top, modules, ranges, inputs, directs, outputs, recomputed)


def _direct_inputs(layout: Layout, start: int, end: int, extra: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Model inputs a stage reads itself (they are fed to it, not sent along the pipeline)."""
    stage_nodes = set(layout.sequence[start:end])
    used = {p for p in layout.placeholders if any(u in stage_nodes for u in p.users)}
    used |= {p for p in extra if p.op == "placeholder"}
    return [p for p in layout.placeholders if p in used]


def _stage_module(gm: torch.fx.GraphModule, layout: Layout, start: int, end: int,
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
        if is_sym_size(node) and isinstance(node.args[0], torch.fx.Node) and node.args[0] not in env \
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
    symbol = size_symbol(node.meta.get("val"))
    for tensor in tensors:
        value = tensor.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if symbol is not None and size_symbol(size) == symbol:
                new = graph.call_function(torch.ops.aten.sym_size.int, (env[tensor], dim))
                new.meta = dict(node.meta)
                return new
    raise PassError(f"pipeline: {node.name} reads the size {symbol} of a tensor this stage does not receive "
                    "and no received tensor has that size; this is a bug in the pass, report it")


def _compose(gm: torch.fx.GraphModule, layout: Layout, stages: list[torch.fx.GraphModule],
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


def tied_parameters(gm: torch.nn.Module, stages: list[torch.fx.GraphModule]) -> list[dict[str, Any]]:
    """Trainable parameters (by identity) that more than one stage reads."""
    names = {id(p): n for n, p in gm.named_parameters()}
    holders: dict[int, list[int]] = {}
    for index, stage in enumerate(stages):
        for parameter in {id(p) for p in stage.parameters() if p.requires_grad}:
            holders.setdefault(parameter, []).append(index)
    return [{"parameter": names.get(pid, "?"), "stages": held} for pid, held in holders.items() if len(held) > 1]


def stage_modules(module: torch.nn.Module) -> list[torch.fx.GraphModule]:
    """The stage GraphModules of a module the ``pipeline`` pass produced, in order."""
    found = []
    while hasattr(module, f"{STAGE_PREFIX}{len(found)}"):
        found.append(getattr(module, f"{STAGE_PREFIX}{len(found)}"))
    return found
