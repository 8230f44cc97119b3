"""Run the zoo's checks on one built spec and judge each: verified, no-op, clear refusal, failure, or
silently wrong. effcompile is reached only through its public API (``effcompile.compile``, the ONNX
exporter and the ORT trainer)."""

from __future__ import annotations

import copy
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .judges import (
    aliased_tensors,
    dead_parameters,
    gradient_differences,
    gradient_presence,
    gradients,
    model_objective,
    shifted_batches,
    train_losses,
    trajectory,
)

# Each check: the passes it runs (``onnx``: capture, then the ONNX Runtime training artifacts and 3 steps).
CHECKS: dict[str, tuple[str, ...]] = {
    "identity": ("identity",), "lora": ("lora",), "lowrank": ("lowrank",), "sas": ("sas",), "amp": ("amp",),
    "remat": ("remat",), "pipeline": ("pipeline",), "lora,amp,remat": ("lora", "amp", "remat"),
    "lora,sas,amp,remat": ("lora", "sas", "amp", "remat"), "onnx": (),
}
# Options where a default does not suit a 32-token example: sas tiles small enough to be sparse at this
# length; lowrank has no default rank.
OPTIONS: dict[str, dict[str, Any]] = {"sas": {"block_size": 8, "window": 16}, "lowrank": {"energy": 0.9}}
OUTCOMES = ("verified", "noop", "refused", "failed", "wrong")
ORT_STEPS = 3
ORT_RTOL = 1e-3
_ANSI = re.compile(r"\x1b\[")
_WHERE = re.compile(r"(\b[A-Za-z_]\w*(\.\w+){1,}\b|\baten\.|\bnode\b|\bop\b|`)")


@dataclass
class CheckResult:
    """One check's verdict. ``message``: the refusal/failure line or the defect found; ``details``: the
    numbers behind it (verification errors, judges' findings, loss curves)."""

    check: str
    outcome: str
    message: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class Context:
    """What every check of one spec shares: the original's gradient presence and reference losses,
    computed once, on the untouched original."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.objective = model_objective(spec.loss_fn)
        self._presence: dict[str, bool] | None = None
        self._reference: list[float] | None = None

    def presence(self) -> dict[str, bool]:
        """Which of the original's trainable parameters get a gradient."""
        if self._presence is None:
            self._presence = gradient_presence(self.spec.module, self.objective, self.spec.args, self.spec.kwargs)
        return self._presence


def judge_error(check: str, error: BaseException, seconds: float) -> CheckResult:
    """A raised error as a verdict: an EffcompileError with one clean line is a clear refusal; a failed
    verification, an internal error wrapped as PassError ("report it"), a multi-line or coloured
    message, or any other exception is a failure."""
    from effcompile import EffcompileError, VerificationError

    text = str(error)
    line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    details = {"type": type(error).__name__, "one_line": "\n" not in text.strip(), "ansi": bool(_ANSI.search(text)),
               "names_where": bool(_WHERE.search(line)), "names_fix": ";" in line}
    if isinstance(error, VerificationError):
        return CheckResult(check, "failed", f"verification: {line}", seconds, details)
    if isinstance(error, EffcompileError) and details["one_line"] and not details["ansi"] \
            and "report it" not in line:
        return CheckResult(check, "refused", line, seconds, details)
    return CheckResult(check, "failed", f"{type(error).__name__}: {line}"[:600], seconds, details)


def run_check(context: Context, check: str) -> CheckResult:
    """Run ``check`` (a key of ``CHECKS``) on the context's spec and judge it. Never raises (but for
    KeyboardInterrupt): whatever goes wrong is the verdict."""
    started = time.perf_counter()
    try:
        if check == "onnx":
            result = _onnx_check(context)
        else:
            result = _pass_check(context, check)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - every error is a verdict here
        result = judge_error(check, error, 0.0)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _pass_check(context: Context, check: str) -> CheckResult:
    import effcompile

    spec = context.spec
    passes = list(CHECKS[check])
    options = {p: OPTIONS[p] for p in passes if p in OPTIONS}
    compiled = effcompile.compile(spec, passes=passes, options=options)
    records = compiled.report.records
    details: dict[str, Any] = {"records": [_record(r) for r in records]}
    for key in ("data_branches", "custom_functions"):  # what capture took on trust of the example (see table)
        if compiled.report.model.get(key):
            details[key] = compiled.report.model[key]
    problems = _judge_module(context, compiled.module, details)
    exact = all(r.exact for r in records)
    same_trainable = {n for n, p in spec.module.named_parameters() if p.requires_grad} == \
        {n for n, p in compiled.module.named_parameters() if p.requires_grad}
    if exact and same_trainable:
        differing = gradient_differences(gradients(spec.module, context.objective, spec.args, spec.kwargs),
                                         gradients(compiled.module, context.objective, spec.args, spec.kwargs))
        if differing:
            problems.append(f"{len(differing)} parameter gradient(s) differ from the original's: "
                            f"{', '.join(differing[:3])}")
        curve = trajectory(spec.module, compiled.module, context.objective, spec.args, spec.kwargs)
        details["trajectory"] = {"reference": curve.reference, "candidate": curve.candidate, "max_rel": curve.max_rel}
        if not curve.ok:
            problems.append(f"loss over {len(curve.reference)} AdamW steps differs from the original's "
                            f"(max rel {curve.max_rel:.2g}: {curve.reference[-1]:.6g} vs {curve.candidate[-1]:.6g})")
    if problems:
        return CheckResult(check, "wrong", "; ".join(problems), details=details)
    if not any(r.changed or r.name == "identity" for r in records):
        return CheckResult(check, "noop", "; ".join(f"{r.name}: {r.reason}" for r in records), details=details)
    return CheckResult(check, "verified", "", details=details)


def _judge_module(context: Context, module: torch.nn.Module, details: dict[str, Any]) -> list[str]:
    """Dead parameters and aliases of the original; returns the problems (and fills ``details``)."""
    spec = context.spec
    problems = []
    aliases = aliased_tensors(spec.module, module)
    if aliases:
        details["aliases"] = aliases
        problems.append(f"{len(aliases)} tensor(s) alias the original model's ({aliases[0]})")
    presence = gradient_presence(module, context.objective, spec.args, spec.kwargs)
    dead = dead_parameters(context.presence(), presence)
    if dead.dead_in_both:
        details["dead_in_both"] = dead.dead_in_both
    if dead.dead:
        details["dead"] = dead.dead
        problems.append(f"{len(dead.dead)} trainable parameter(s) get no gradient ({dead.dead[0]})")
    return problems


def _record(record: Any) -> dict[str, Any]:
    verify = record.verify
    summary = {"name": record.name, "changed": record.changed, "reason": record.reason, "exact": record.exact}
    if verify is not None:
        summary.update(output_max_rel=verify.output_max_rel, grad_max_rel=verify.grad_max_rel,
                       grad_max_rel_param=verify.grad_max_rel_param, no_grad_params=verify.no_grad_params,
                       grads_compared=verify.grads_compared, grads_not_compared=len(verify.grads_not_compared))
    return summary


def _onnx_check(context: Context) -> CheckResult:
    import effcompile
    from effcompile.export.onnx import export_training_artifacts
    from effcompile.train.ort import OrtTrainer

    spec = context.spec
    compiled = effcompile.compile(spec, passes=[], measure=False)
    batches = shifted_batches(spec.args, spec.kwargs, ORT_STEPS)
    with tempfile.TemporaryDirectory(prefix="zoo-onnx-") as folder:
        export_training_artifacts(compiled.program, folder, lr=1e-3)
        trainer = OrtTrainer(folder, threads=1)
        ort_losses = [trainer.step(_feeds(trainer, args, kwargs)) for args, kwargs in batches]
        del trainer
    torch_losses = train_losses(copy.deepcopy(compiled.module), context.objective, batches, lr=1e-3)
    max_rel = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(ort_losses, torch_losses))
    details: dict[str, Any] = {"ort": ort_losses, "torch": torch_losses, "max_rel": max_rel}
    # what the export trains is the captured module: a parameter it cannot train is wrong here too
    problems = _judge_module(context, compiled.module, details)
    if not max_rel <= ORT_RTOL:
        problems.append(f"ONNX Runtime's loss curve differs from PyTorch's (max rel {max_rel:.2g}: "
                        f"{ort_losses} vs {torch_losses})")
    if problems:
        return CheckResult("onnx", "wrong", "; ".join(problems), details=details)
    return CheckResult("onnx", "verified", "", details=details)


def _feeds(trainer: Any, args: tuple, kwargs: dict) -> Any:
    if kwargs and not args and all(name in kwargs for name in trainer.input_names):
        return {name: kwargs[name] for name in trainer.input_names}
    return [*args, *kwargs.values()]
