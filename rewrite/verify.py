"""Run two programs on the same example inputs, same random state, and compare outputs and parameter
gradients. Exact passes must match to float32 round-off; approximate ones report their error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .program import Program

# float32 round-off after reordering a few reductions: relative to each tensor's own scale.
EXACT_RTOL = 1e-4
EXACT_ATOL_FRACTION = 1e-5


@dataclass
class VerifyResult:
    """Errors of a candidate against a reference. ``*_rel`` are max|a-b| / max|b| per tensor, maxed
    over tensors; ``ok`` says whether the pass's contract (exact or within ``tolerance``) held."""

    output_max_abs: float = 0.0
    output_max_rel: float = 0.0
    loss_reference: float | None = None
    loss_candidate: float | None = None
    grad_max_abs: float = 0.0
    grad_max_rel: float = 0.0
    grads_compared: int = 0
    grads_not_compared: list[str] = field(default_factory=list)
    exact: bool = True
    tolerance: float | None = None
    ok: bool = True
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded to 9 significant digits)."""
        data = asdict(self)
        return {k: (float(f"{v:.9g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in data.items()}


def _run(program: Program, module: torch.nn.Module) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    output = program.run(module)
    objective = program.objective(output)
    objective.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in module.named_parameters()
             if p.requires_grad and p.grad is not None}
    module.zero_grad(set_to_none=True)
    leaves = [t.detach().float() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    return leaves, objective.detach().float(), grads


def _errors(candidate: torch.Tensor, reference: torch.Tensor, floor: float = 1e-6) -> tuple[float, float, bool]:
    """(max abs error, relative to the reference's max abs, close to float32 round-off). ``floor``: the
    smallest scale the absolute tolerance is taken from (see ``compare``)."""
    difference = (candidate - reference).abs()
    max_abs = float(difference.max()) if difference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    close = bool(torch.allclose(candidate, reference, rtol=EXACT_RTOL, atol=EXACT_ATOL_FRACTION * max(scale, floor)))
    if not (math.isfinite(max_abs)):
        close = False
    return max_abs, rel, close


def compare(reference: Program, candidate: Program, exact: bool, tolerance: float | None = None) -> VerifyResult:
    """Run both programs (train mode, seed 0) and compare outputs, objective and parameter gradients.

    Gradients are compared for trainable parameters present under the same name in both; the others
    are listed in ``grads_not_compared``. ``exact`` applies float32 round-off tolerances; otherwise the
    run fails only when the output's relative error exceeds ``tolerance`` (None: never).
    """
    ref_leaves, ref_loss, ref_grads = _run(reference, reference.gm)
    new_leaves, new_loss, new_grads = _run(candidate, candidate.gm)
    result = VerifyResult(exact=exact, tolerance=tolerance, loss_reference=float(ref_loss), loss_candidate=float(new_loss))
    if len(ref_leaves) != len(new_leaves):
        result.ok = False
        result.failures.append(f"output has {len(new_leaves)} tensors, reference {len(ref_leaves)}")
    for index, (ref, new) in enumerate(zip(ref_leaves, new_leaves)):
        if ref.shape != new.shape:
            result.ok = False
            result.failures.append(f"output {index} has shape {tuple(new.shape)}, reference {tuple(ref.shape)}")
            continue
        max_abs, rel, close = _errors(new, ref)
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
        max_abs, rel, close = _errors(new_grad, ref_grad, floor)
        result.grads_compared += 1
        result.grad_max_abs, result.grad_max_rel = max(result.grad_max_abs, max_abs), max(result.grad_max_rel, rel)
        if exact and not close:
            result.ok = False
            if len(result.failures) < 5:
                result.failures.append(f"gradient of {name} differs (max abs {max_abs:.3g}, rel {rel:.3g})")
    if not exact and tolerance is not None and result.output_max_rel > tolerance:
        result.ok = False
        result.failures.append(f"output error {result.output_max_rel:.3g} exceeds the tolerance {tolerance:g}")
    return result
