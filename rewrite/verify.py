"""Run two programs on the same example inputs, same random state, and compare outputs and parameter
gradients. Exact passes must match to float32 round-off; approximate ones report their error.

An exact pass must also keep the random stream (dropout masks drawn in the same order), so both sides run
as captured, with the same seed. An approximate pass is measured with dropout off on both sides (every
dropout call and attention's ``dropout_p`` run at probability 0): its error is then its own, not the
difference between two dropout draws. Each side's training step (forward and backward) is also counted
by ``torch.utils.flop_counter.FlopCounterMode``: the FLOPs a step really costs, recomputation included.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .plans import ComputePrecision
from .program import Program

# float32 round-off after reordering a few reductions: relative to each tensor's own scale.
EXACT_RTOL = 1e-4
EXACT_ATOL_FRACTION = 1e-5
# After amp, an exact pass reorders low-precision reductions: this many of that dtype's epsilons.
LOW_PRECISION_EPSILONS = 4.0


def exact_tolerances(precision: ComputePrecision | None) -> tuple[float, float]:
    """(rtol, atol as a fraction of each tensor's scale) of the exact check for a program computing in
    ``precision`` (None or float32: float32 round-off; bf16/fp16: ``LOW_PRECISION_EPSILONS`` of its epsilon)."""
    if precision is None or not precision.dtype.is_floating_point or torch.finfo(precision.dtype).eps <= torch.finfo(torch.float32).eps:
        return EXACT_RTOL, EXACT_ATOL_FRACTION
    eps = LOW_PRECISION_EPSILONS * torch.finfo(precision.dtype).eps
    return max(EXACT_RTOL, eps), max(EXACT_ATOL_FRACTION, eps)


@dataclass
class VerifyResult:
    """Errors of a candidate against a reference. ``*_rel`` are max|a-b| / max|b| per tensor (for gradients,
    over max(|b|'s max, the floor the exact check uses)), maxed over tensors; ``grad_max_rel_param`` names
    the gradient that sets ``grad_max_rel``. ``no_grad_params`` are the candidate's trainable parameters
    that got no gradient (``no_grad_params_reference``: the reference's); ``ok`` says whether the pass's
    contract (exact or within ``tolerance``) held."""

    output_max_abs: float = 0.0
    output_max_rel: float = 0.0
    loss_reference: float | None = None
    loss_candidate: float | None = None
    grad_max_abs: float = 0.0
    grad_max_rel: float = 0.0
    grads_compared: int = 0
    grads_not_compared: list[str] = field(default_factory=list)
    grad_max_rel_param: str | None = None
    no_grad_params: list[str] = field(default_factory=list)
    no_grad_params_reference: list[str] = field(default_factory=list)
    exact: bool = True
    tolerance: float | None = None
    ok: bool = True
    failures: list[str] = field(default_factory=list)
    dropout_off: bool = False
    dropout_calls: int = 0
    training_flops_reference: int | None = None
    training_flops_candidate: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded to 9 significant digits)."""
        data = asdict(self)
        return {k: (float(f"{v:.9g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in data.items()}


#: Dropout functions and where their probability argument is (position, keyword).
_DROPOUT_FUNCTIONS: dict[Any, tuple[int, str]] = {
    **{f: (1, "p") for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                             F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                             torch.feature_alpha_dropout)},
    F.scaled_dot_product_attention: (4, "dropout_p"),
}


def _probability_argument(func: Any) -> tuple[int, str] | None:
    """Where a dropout probability is among ``func``'s arguments: the functions above, and ATen ops whose
    schema has a ``p`` (dropout ops) or ``dropout_p`` (attention) argument."""
    if func in _DROPOUT_FUNCTIONS:
        return _DROPOUT_FUNCTIONS[func]
    schema = getattr(func, "_schema", None)
    if schema is None:
        return None
    names = [argument.name for argument in schema.arguments]
    if "dropout_p" in names:
        return names.index("dropout_p"), "dropout_p"
    if "p" in names and "dropout" in schema.name:
        return names.index("p"), "p"
    return None


class DropoutOff(TorchFunctionMode):
    """Run every dropout call (``F.dropout`` and friends, ``nn.Dropout``, ``aten.dropout``/``native_dropout``)
    and every attention call's ``dropout_p`` at probability 0; ``calls`` counts those that had p > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        where = _probability_argument(func)
        if where is not None:
            position, name = where
            if name in kwargs:
                self.calls += bool(kwargs[name])
                kwargs[name] = 0.0
            elif len(args) > position:
                self.calls += bool(args[position])
                args = (*args[:position], 0.0, *args[position + 1:])
        return func(*args, **kwargs)


def _run(program: Program, module: torch.nn.Module, dropout_off: bool) -> tuple[Any, torch.Tensor,
                                                                                  dict[str, torch.Tensor], int, int,
                                                                                  list[str]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    off = DropoutOff() if dropout_off else None
    with FlopCounterMode(display=False) as counter, off if off is not None else contextlib.nullcontext():
        output = program.run(module)
        objective = program.objective(output)
        objective.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in module.named_parameters()
             if p.requires_grad and p.grad is not None}
    no_grad = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    module.zero_grad(set_to_none=True)
    leaves = [t.detach().float() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    return (leaves, objective.detach().float(), grads, int(counter.get_total_flops()), off.calls if off else 0,
            no_grad)


def _errors(candidate: torch.Tensor, reference: torch.Tensor, floor: float = 1e-6,
            tolerances: tuple[float, float] = (EXACT_RTOL, EXACT_ATOL_FRACTION)) -> tuple[float, float, bool]:
    """(max abs error, relative to max(the reference's max abs, ``floor``), close within ``tolerances``:
    (rtol, atol as a fraction of that scale), float32 round-off by default).
    ``floor``: the smallest scale the absolute tolerance is taken from (see ``compare``); the relative error
    uses the same, so a gradient that is zero in exact arithmetic does not report round-off as a huge error."""
    difference = (candidate - reference).abs()
    max_abs = float(difference.max()) if difference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    rel = max_abs / max(scale, floor) if max(scale, floor) > 0 else max_abs
    rtol, atol_fraction = tolerances
    close = bool(torch.allclose(candidate, reference, rtol=rtol, atol=atol_fraction * max(scale, floor)))
    if not (math.isfinite(max_abs)):
        close = False
    return max_abs, rel, close


def compare(reference: Program, candidate: Program, exact: bool, tolerance: float | None = None) -> VerifyResult:
    """Run a training step of both programs (train mode, seed 0; dropout off when not ``exact``) and compare
    outputs, objective and parameter gradients.

    Gradients are compared for trainable parameters present under the same name in both; the others
    are listed in ``grads_not_compared``. ``exact`` applies round-off tolerances of the precision the
    candidate computes in (``ComputePrecision``, left by ``amp``; float32 without it); otherwise the
    run fails only when the output's relative error exceeds ``tolerance`` (None: never). The result also
    holds each side's training-step FLOPs.
    """
    ref_leaves, ref_loss, ref_grads, ref_flops, calls, ref_dead = _run(reference, reference.gm, not exact)
    new_leaves, new_loss, new_grads, new_flops, new_calls, new_dead = _run(candidate, candidate.gm, not exact)
    result = VerifyResult(exact=exact, tolerance=tolerance, loss_reference=float(ref_loss), loss_candidate=float(new_loss),
                          dropout_off=not exact, dropout_calls=max(calls, new_calls),
                          training_flops_reference=ref_flops, training_flops_candidate=new_flops,
                          no_grad_params=new_dead, no_grad_params_reference=ref_dead)
    tolerances = exact_tolerances(candidate.plan(ComputePrecision))
    # A trainable parameter that gets no gradient never trains: for an exact pass that is a failure unless
    # the reference's parameter of that name got none either (a model's own unused parameter, listed).
    dead = [name for name in new_dead if name not in ref_dead]
    if exact and dead:
        result.ok = False
        result.failures.append(f"{len(dead)} trainable parameter(s) get no gradient ({', '.join(dead[:3])}"
                               f"{', …' if len(dead) > 3 else ''})")
    if len(ref_leaves) != len(new_leaves):
        result.ok = False
        result.failures.append(f"output has {len(new_leaves)} tensors, reference {len(ref_leaves)}")
    for index, (ref, new) in enumerate(zip(ref_leaves, new_leaves)):
        if ref.shape != new.shape:
            result.ok = False
            result.failures.append(f"output {index} has shape {tuple(new.shape)}, reference {tuple(ref.shape)}")
            continue
        max_abs, rel, close = _errors(new, ref, tolerances=tolerances)
        result.output_max_abs, result.output_max_rel = max(result.output_max_abs, max_abs), max(result.output_max_rel, rel)
        if exact and not close:
            result.ok = False
            result.failures.append(f"output {index} differs (max abs {max_abs:.3g}, rel {rel:.3g})")
    # A gradient that is zero in exact arithmetic (OPT's key-projection bias: softmax ignores a per-row shift)
    # is round-off of terms the size of the other gradients; its tolerance scale is floored at 1e-3 of the
    # largest gradient, so float32 noise there is not a difference.
    grad_scale = max((float(g.abs().max()) for g in ref_grads.values() if g.numel()), default=0.0)
    floor = max(1e-6, 1e-3 * grad_scale)
    for name, ref_grad in ref_grads.items():
        new_grad = new_grads.get(name)
        if new_grad is None or new_grad.shape != ref_grad.shape:
            result.grads_not_compared.append(name)
            continue
        max_abs, rel, close = _errors(new_grad, ref_grad, floor, tolerances)
        result.grads_compared += 1
        result.grad_max_abs = max(result.grad_max_abs, max_abs)
        if rel > result.grad_max_rel or result.grad_max_rel_param is None:
            result.grad_max_rel, result.grad_max_rel_param = max(result.grad_max_rel, rel), name
        if exact and not close:
            result.ok = False
            if len(result.failures) < 5:
                result.failures.append(f"gradient of {name} differs (max abs {max_abs:.3g}, rel {rel:.3g})")
    if not exact and tolerance is not None and result.output_max_rel > tolerance:
        result.ok = False
        result.failures.append(f"output error {result.output_max_rel:.3g} exceeds the tolerance {tolerance:g}")
    return result
