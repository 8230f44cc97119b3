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
3. Solve the contiguous partition exactly (``partition``): the smallest largest-stage cost,
   then, within ``cut_slack`` of it, the fewest bytes sent.
4. Emit one GraphModule per stage (inputs: the activations received, then the model inputs it reads;
   outputs: the activations it sends, or for the last stage the model's flat outputs) and replace the
   program's module by one that calls the stages in order, so verification checks the composition.
   Parameters keep their names: the composed module holds the original attribute tree first and each
   stage refers to the same tensors. A parameter read by two stages (tied embeddings) is reported; with
   ``tied=replicate`` each stage keeps a copy and the runtime sums their gradients across those ranks.
5. Leave a ``PipelinePlan`` (``effcompile.plans``) on the program for the runtime (``effcompile.train.pipeline``).

Modules: ``config`` (options), ``layout`` (steps 1-2 and the choice of cuts), ``partition`` (the solver),
``stages`` (step 4), ``report`` (the plan and the report).
"""

from __future__ import annotations

import logging

from effcompile.analysis import analyze, measure_node_seconds
from effcompile.errors import PassError
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.plans import PipelinePlan
from effcompile.program import Program

from .config import PipelineConfig
from .layout import Layout, choose_cuts
from .report import bubble_fraction, make_plan, stage_report
from .stages import STAGE_PREFIX, build_stages, stage_modules, tied_parameters

log = logging.getLogger(__name__)


@register
class Pipeline(Pass):
    """Split the graph into K contiguous stages with balanced cost and light cuts."""

    name = "pipeline"
    summary = "cut the graph into K cost-balanced pipeline stages for torch.distributed.pipelining"
    exact = True
    last = True  # the stages are the program handed to the pipeline runtime

    Config = PipelineConfig

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
        layout = Layout(program, analysis)
        node_costs = layout.node_costs(config.balance, seconds)
        cut_positions = choose_cuts(layout, node_costs, config)
        built = build_stages(program, layout, cut_positions)
        tied = tied_parameters(program.gm, built.stage_modules)
        if tied and config.tied == "refuse":
            first = tied[0]
            raise PassError(f"pipeline: parameter {first['parameter']} is read by stages {first['stages']} "
                            "(tied weights); set pipeline.tied=replicate to keep a copy on each stage and sum "
                            "their gradients, or untie them in the model")
        plan = make_plan(program, layout, built, config, tied)
        program.gm = built.top
        program.set_plan(plan)
        details = stage_report(layout, analysis, built, node_costs, cut_positions, config, tied, seconds)
        details["plan"] = plan.to_dict()
        stats = {"stages": config.stages, "imbalance": details["imbalance"],
                 "bubble_fraction": details["bubble_fraction"],
                 "max_cut_bytes": max((c["bytes"] for c in details["cuts"]), default=0)}
        log.info("pipeline: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats=stats, details=details)


__all__ = ["STAGE_PREFIX", "Pipeline", "PipelineConfig", "PipelinePlan", "bubble_fraction", "stage_modules"]
