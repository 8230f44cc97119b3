"""What the ``pipeline`` pass tells its consumers: the ``PipelinePlan`` for the runtime, and the report (stage
costs, cuts, imbalance, the schedule's bubble)."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from effcompile.analysis import Analysis, to_networkx
from effcompile.graph import module_path
from effcompile.plans import PipelinePlan, TiedParameter
from effcompile.program import Program, loss_field

from .config import PipelineConfig
from .layout import Layout
from .stages import STAGE_PREFIX, Built


def bubble_fraction(schedule: str, stages: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a pipeline step: (p-1)/(v*M + p-1) for p ranks holding v stages each (v=1 for
    GPipe and 1F1B)."""
    ranks = stages // stages_per_rank if schedule == "interleaved" else stages
    virtual = stages_per_rank if schedule == "interleaved" else 1
    return (ranks - 1) / (virtual * microbatches + ranks - 1)


def _loss_output_index(program: Program, layout: Layout, output_leaves: list[torch.fx.Node]) -> int | None:
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


def make_plan(program: Program, layout: Layout, built: Built, config: PipelineConfig,
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


def stage_report(layout: Layout, analysis: Analysis, built: Built, node_costs: list[float], cuts: list[int],
            config: PipelineConfig, tied: list[dict[str, Any]], seconds: dict[str, float] | None) -> dict[str, Any]:
    """The pass's report: per stage its nodes, modules, cost, FLOPs, parameters and activation bytes; the
    cuts and what each sends; imbalance, the schedule's bubble and the tied parameters."""
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
