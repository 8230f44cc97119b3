"""Typed plans that a pass leaves on the Program for a consumer outside ``passes/`` (stored under their type:
``program.set_plan(plan)``, ``program.plan(PipelinePlan)``). The pass that fills a plan owns its meaning; the
definition lives here so that its consumers (``effcompile.train.pipeline``) need not import the pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx


@dataclass(frozen=True)
class ComputePrecision:
    """The lowest floating dtype the program computes its matmuls and attention in (left by ``amp``). An exact
    pass after it is verified at that dtype's round-off, not float32's: two orderings of the same bf16
    reductions differ by a few bf16 epsilons (``effcompile.verify.exact_tolerances``)."""

    dtype: torch.dtype


@dataclass
class TiedParameter:
    """A trainable parameter that several stages read (tied embeddings): its first module name and the
    stages holding a copy, whose gradients the runtime sums."""

    parameter: str
    stages: list[int]


@dataclass
class PipelinePlan:
    """What the ``pipeline`` pass decided and the pipeline runtime needs: the stages and how data flows
    between them. Names are the original graph's node names (placeholders: the model's flat inputs).

    Attributes:
        stages: K, the number of stages.
        schedule: ``gpipe``, ``1f1b`` or ``interleaved``.
        microbatches: micro-batches per step.
        stages_per_rank: stages each rank holds (1 unless interleaved).
        modules: the stage GraphModules, in order — submodules of the program's GraphModule (``Program.clone``
            copies them with it).
        stage_names: their attribute names on the program's GraphModule (``pipeline_stage0``, ...).
        inputs: per stage, the activations it receives from the stage before.
        direct_inputs: per stage, the model inputs it reads itself.
        outputs: per stage, the activations it sends (the last stage: the model's flat outputs).
        target_inputs: model inputs only the last stage reads (the schedule's target, e.g. ``labels``).
        first_nodes: per stage, the name of its first compute node (where the cuts are).
        placeholders: the model's flat input names, in order.
        loss_output_index: which of the last stage's outputs is the loss, or None (the model has a loss_fn).
        tied: parameters several stages read.
        capture_path: how the program was captured.
    """

    stages: int
    schedule: str
    microbatches: int
    stages_per_rank: int
    modules: list[torch.fx.GraphModule]
    stage_names: list[str]
    inputs: list[list[str]]
    direct_inputs: list[list[str]]
    outputs: list[list[str]]
    target_inputs: list[str]
    first_nodes: list[str]
    placeholders: list[str]
    loss_output_index: int | None
    tied: list[TiedParameter] = field(default_factory=list)
    capture_path: str = "symbolic_trace"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field but the modules (tied parameters as dicts)."""
        return {f.name: [dataclasses.asdict(t) for t in self.tied] if f.name == "tied" else getattr(self, f.name)
                for f in dataclasses.fields(self) if f.name != "modules"}


@dataclass(frozen=True)
class ExecutionPlan:
    """How the rewritten module should run in training, decided by a pass (``auto``) and read by the trainer
    and by ``CompileResult.runnable()``: eagerly, or compiled with ``torch.compile``.

    Attributes:
        compile: wrap the module in ``torch.compile`` before training.
        compile_mode: ``torch.compile``'s ``mode`` (None: its default).
        stack: the passes (in order) the program went through to get here.
        options: those passes' options (``{pass: {option: value}}``), enough to replay the choice with
            ``effcompile.compile(model, inputs, passes=list(stack), options=options)``.
        chosen_by: the pass that decided (``"auto"``).
        reason: one line: why this stack and this way of running it.
    """

    compile: bool = False
    compile_mode: str | None = None
    stack: tuple[str, ...] = ()
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    chosen_by: str = ""
    reason: str = ""

    def runnable(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` as the plan runs it: ``torch.compile(module, mode=compile_mode)`` when ``compile``, else
        ``module`` itself. The compiled wrapper shares the module's parameters (train either; the weights are the
        same tensors). Compilation happens lazily, at the first call."""
        if not self.compile:
            return module
        return torch.compile(module, mode=self.compile_mode) if self.compile_mode else torch.compile(module)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``from_dict`` reads it back)."""
        return {"compile": self.compile, "compile_mode": self.compile_mode, "stack": list(self.stack),
                "options": {k: dict(v) for k, v in self.options.items()}, "chosen_by": self.chosen_by,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionPlan:
        """The plan ``to_dict`` wrote (unknown keys are ignored, missing ones take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "stack" in values:
            values["stack"] = tuple(values["stack"])
        return cls(**values)
