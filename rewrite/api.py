"""The front door: ``compile`` (spec → capture → passes → verify), ``save`` and ``load``."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .analysis import Analysis, HostLink, host_link_bandwidth, parameter_count
from .capture import capture
from .errors import OptionError, SpecError, guard
from .export.module import load_module, save_module
from .pass_manager import PassManager
from .plans import ExecutionPlan
from .program import Program
from .progress import Progress, stage
from .report import Report
from .spec import ModelSpec, normalise_inputs


@dataclass
class CompileResult:
    """``module``: the trainable rewritten GraphModule (called like the original); ``program``: it with
    its example inputs and loss; ``report``: the records (``report.to_json()``). ``module`` is always the eager
    module; ``runnable()`` is what to train when a pass (``auto``) decided it should run compiled."""

    module: torch.fx.GraphModule
    program: Program
    report: Report
    _runnable: torch.nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def execution(self) -> ExecutionPlan:
        """How to run the module (``ExecutionPlan``): what a pass (``auto``) decided, else eager."""
        return self.program.plan(ExecutionPlan) or ExecutionPlan()

    def runnable(self) -> torch.nn.Module:
        """The module to train: ``torch.compile(module)`` when the execution plan says so, else ``module``.
        Built once (later calls return the same wrapper); it shares ``module``'s parameters."""
        if self._runnable is None:
            self._runnable = self.execution.runnable(self.module)
        return self._runnable

    def save(self, folder: str, force: bool = False) -> str:
        """Write ``report.json`` and ``module/`` under ``folder`` atomically; returns the folder."""
        return save(self, folder, force)


def compile(model: torch.nn.Module | ModelSpec, example_inputs: Any = None, passes: Sequence[str] = (),
            options: Mapping[str, Mapping[str, Any]] | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
            verify: bool = True, measure: bool = True, max_error: float | None = None,
            capture_path: str = "auto", dynamic_batch: bool = True, progress: Progress | None = None) -> CompileResult:
    """Capture ``model`` on ``example_inputs`` (a tuple of positional inputs, a dict of keyword inputs,
    or one tensor), run ``passes`` in order with ``options`` (``{"remat": {"budget": 0.5}}``), verify each
    against its input, and return the result. Never modifies ``model``.

    ``loss_fn(output, *inputs)`` is the training objective (default: the output's ``loss`` field);
    ``max_error`` fails approximate passes whose relative output error exceeds it; ``measure`` runs the
    cost model before and after each pass (bytes saved for backward, FLOPs); ``dynamic_batch=False``
    captures exported graphs at the example's batch size only (faster capture); ``progress`` receives a
    ``effcompile.progress.Stage`` as each stage (capture, analysis, each pass, its verification) starts
    and ends.

    Raises ``EffcompileError`` subclasses for bad input (exit code 2), ``VerificationError`` when an
    exact pass changed the numerics and ``ToleranceError`` when an approximate one exceeded ``max_error``
    (1), and ``InternalError`` for a bug (3), naming the stage or pass it happened in.
    """
    check_max_error(max_error, verify)
    if isinstance(model, ModelSpec):
        spec = model
    else:
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"compile() needs a torch.nn.Module, got {type(model).__name__}")
        args, kwargs = normalise_inputs(example_inputs, "compile()")
        spec = ModelSpec(model, args, kwargs, loss_fn, type(model).__name__)
    from .pass_manager import resolve_passes

    resolved = resolve_passes(list(passes), options or {})
    with stage(progress, "capture") as note, guard("capture"):
        program = capture(spec, capture_path, dynamic_batch)
        note.detail = program.capture_path
    if any(pass_.needs_host_link(config) for pass_, config in resolved):
        supply_host_link(program)
    manager = PassManager(resolved, verify=verify, measure=measure, max_error=max_error, progress=progress)
    result = manager.run(program)
    report = Report(model=_model_summary(result.program, program, result.analysis_before), records=result.records)
    if (plan := result.program.plan(ExecutionPlan)) is not None:
        report.execution = plan.to_dict()
    if result.records and result.records[0].verify is not None:  # the captured program's training step, counted
        report.model["training_flops"] = result.records[0].verify.training_flops_reference
    final = result.program
    del program, result
    gc.collect()  # the captured program (its own parameter copies) sits in GraphModule reference cycles
    return CompileResult(final.gm, final, report)


def supply_host_link(program: Program) -> None:
    """Measure (once per device, then cached on disk) the host link of the CUDA device ``program`` is on and
    store it on the Program as ``analysis.HostLink`` for passes that price copies to host memory. Nothing on
    the CPU (no link: a pass uses its profile's figure)."""
    parameter = next(program.gm.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return
    program.set_plan(HostLink(*host_link_bandwidth(parameter.device)))


def check_max_error(max_error: float | None, verify: bool = True) -> None:
    """Raise OptionError unless ``max_error`` is None or a finite number ≥ 0 (the largest relative output
    error an approximate pass may cause), and verification is on to measure it."""
    if max_error is None:
        return
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not math.isfinite(max_error) \
            or max_error < 0:
        raise OptionError(f"--max-error {max_error!r} is not a finite number ≥ 0 (the largest relative output "
                          "error an approximate pass may cause); use e.g. --max-error 0.05")
    if not verify:
        raise OptionError("--max-error needs verification to measure the error; drop --no-verify (verify=False)")


def _model_summary(final: Program, captured: Program, analysis: Analysis | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "name": captured.name, "capture_path": captured.capture_path,
        "capture_fallback_reason": captured.meta.get("fallback_reason"),
        "data_branches": list(captured.meta.get("data_branches") or ()),
        "custom_functions": list(captured.meta.get("custom_functions") or ()),
        "dynamic_batch": bool(captured.gm.meta.get("dynamic_batch", False)),
        "nodes": len(captured.gm.graph.nodes), "params": parameter_count(captured.gm),
        "trainable_params": parameter_count(captured.gm, True),
        "final_nodes": len(final.gm.graph.nodes), "final_params": parameter_count(final.gm),
        "final_trainable_params": parameter_count(final.gm, True),
    }
    if analysis is not None:
        summary.update(saved_activation_bytes=analysis.saved_activation_bytes, flops=analysis.total_flops)
    summary["example_inputs"] = example_shapes(captured)
    return summary


def example_shapes(program: Program) -> dict[str, Any]:
    """The example inputs' shapes and dtypes (``{"args": [...], "kwargs": {name: {...}}}``; non-tensors as
    None), what a compiled folder records so that ``effcompile train DIR`` feeds it the same shapes."""
    describe = lambda v: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} \
        if isinstance(v, torch.Tensor) else None  # noqa: E731
    return {"args": [describe(v) for v in program.args], "kwargs": {k: describe(v) for k, v in program.kwargs.items()}}


def save(result: CompileResult, folder: str, force: bool = False) -> str:
    """Write ``report.json`` and the module (``module/structure.json``, ``weights.safetensors``, ``code.py``)
    into ``folder`` atomically (``effcompile.export.folder``: a folder effcompile did not write is never
    replaced; one it wrote only with ``force``). Returns the folder. Raises OutputError."""
    from .export.module import atomic_dir, write_report

    with atomic_dir(folder, force) as staging:
        save_module(result.module, staging / "module")
        result.report.exports["module"] = str(folder) + "/module"
        write_report(result.report.to_json(), staging)
    return str(folder)


def load(folder: str, device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """Load the rewritten module saved in ``folder`` (an ``--out`` folder or its ``module/``). Runs nothing
    from the folder; raises UnsafeFolderError / OutputError for a folder it will not load."""
    return load_module(folder, device)
