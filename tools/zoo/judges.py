"""The zoo's judges of a silently wrong result: each takes the original model and the compiled module
and returns what it found (empty: nothing wrong).

1. ``dead_parameters``: trainable parameters of the compiled module that get no gradient from the
   training objective while the original's parameter of the same name does (a parameter new in the
   compiled module, e.g. a LoRA adapter, must get one). Parameters without a gradient on both sides are
   reported apart (not a defect of the compile).
2. ``aliased_tensors``: tensors held by the compiled module (parameters, buffers, graph constants,
   any tensor attribute of any submodule) that share storage with the original model's parameters or
   buffers — training one would change the other, and a lifted constant would never train.
3. ``trajectory``: the loss over a few AdamW steps (same seed, same batches) of a copy of the original
   and of the compiled module; for exact passes they must agree to round-off.
4. ``gradient_differences``: one backward of each (seed 0); for exact passes each parameter's gradient must
   equal the original's to round-off. A small, consistent gradient error (a custom backward the graph lost)
   moves five loss values by less than the trajectory's tolerance but trains a different model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Objective = Callable[[torch.nn.Module, tuple, dict], torch.Tensor]
TRAJECTORY_STEPS = 5
TRAJECTORY_LR = 1e-3
# Loss trajectories of an exact rewrite differ by float32 round-off, which AdamW's normalised update can
# lift to ~1e-6 relative over a few steps; a parameter that does not train moves the loss by far more.
TRAJECTORY_RTOL = 1e-4


def model_objective(loss_fn: Callable[..., torch.Tensor] | None = None) -> Objective:
    """The training objective of a spec: ``loss_fn(output, *args, **kwargs)``, else the output's ``loss``."""

    def objective(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        output = module(*args, **kwargs)
        if loss_fn is not None:
            return loss_fn(output, *args, **kwargs)
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise ValueError("the model returns no loss; give the spec a loss_fn")
        return loss

    return objective


def gradient_presence(module: torch.nn.Module, objective: Objective, args: tuple, kwargs: dict) -> dict[str, bool]:
    """For each trainable parameter (by name): whether one backward of the objective gives it a gradient.
    Gradients are cleared before and after (set to None)."""
    grads = gradients(module, objective, args, kwargs)
    return {name: name in grads for name, p in module.named_parameters() if p.requires_grad}


@dataclass
class DeadParameters:
    """``dead``: trainable in the compiled module, no gradient, while the original's had one (or the
    parameter is new). ``dead_in_both``: no gradient on either side (listed, not a defect)."""

    dead: list[str] = field(default_factory=list)
    dead_in_both: list[str] = field(default_factory=list)


def dead_parameters(original: dict[str, bool], compiled: dict[str, bool]) -> DeadParameters:
    """Compare two ``gradient_presence`` maps (original model, compiled module). A new parameter inside a
    module whose original parameters all got no gradient (``lowrank``'s factors ``dense.down.weight`` of an
    unused pooler's ``dense.weight``) is dead in both: the layer it replaces never trained either."""
    result = DeadParameters()
    for name, has_grad in compiled.items():
        if has_grad:
            continue
        if original.get(name) is False or (name not in original and _replaces_dead(name, original)):
            result.dead_in_both.append(name)
        else:
            result.dead.append(name)
    return result


def _replaces_dead(name: str, original: dict[str, bool]) -> bool:
    """Whether the innermost module above ``name`` that held original parameters held only ones without a
    gradient."""
    parts = name.split(".")[:-1]
    while parts:
        prefix = ".".join(parts) + "."
        held = [has for key, has in original.items() if key.startswith(prefix) and "." not in key[len(prefix):]]
        if held:
            return not any(held)
        parts.pop()
    return False


def _storages(module: torch.nn.Module) -> dict[int, str]:
    pointers: dict[int, str] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        pointer = _storage_pointer(tensor)
        if pointer:
            pointers.setdefault(pointer, name)
    return pointers


def _storage_pointer(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return 0


def _held_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the module tree holds: parameters, buffers and plain tensor attributes (constants)."""
    held: list[tuple[str, torch.Tensor]] = []
    for prefix, submodule in module.named_modules(remove_duplicate=False):
        where = f"{prefix}." if prefix else ""
        for name, tensor in [*submodule._parameters.items(), *submodule._buffers.items()]:
            if tensor is not None:
                held.append((where + name, tensor))
        for name, value in vars(submodule).items():
            if isinstance(value, torch.Tensor) and not name.startswith("__"):
                held.append((where + name, value))
    return held


def aliased_tensors(original: torch.nn.Module, compiled: torch.nn.Module) -> list[str]:
    """``compiled_name → original_name`` for each tensor of ``compiled`` that shares storage with a
    parameter or buffer of ``original``."""
    originals = _storages(original)
    found = []
    for name, tensor in _held_tensors(compiled):
        pointer = _storage_pointer(tensor)
        if pointer and pointer in originals:
            found.append(f"{name} → {originals[pointer]}")
    return sorted(set(found))


def shifted_batches(args: tuple, kwargs: dict, count: int) -> list[tuple[tuple, dict]]:
    """``count`` batches made from the example by rolling every tensor along its last dimension by the
    step index (token ids stay valid ids, and labels stay aligned with the inputs they were made from)."""
    def shift(value: Any, step: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and step:
            return torch.roll(value, step, dims=-1)
        return value

    return [(tuple(shift(a, k) for a in args), {n: shift(v, k) for n, v in kwargs.items()}) for k in range(count)]


def train_losses(module: torch.nn.Module, objective: Objective, batches: list[tuple[tuple, dict]],
                 lr: float = TRAJECTORY_LR) -> list[float]:
    """Losses of ``len(batches)`` AdamW steps (lr ``lr``, no weight decay) on ``module``'s trainable
    parameters, seed 0 before each step. Trains ``module`` in place."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses = []
    for args, kwargs in batches:
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = objective(module, args, kwargs)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass
class Trajectory:
    """The two loss curves and their largest step-wise difference relative to the reference loss."""

    reference: list[float]
    candidate: list[float]
    max_rel: float

    @property
    def ok(self) -> bool:
        """Within ``TRAJECTORY_RTOL`` at every step (and finite)."""
        return math.isfinite(self.max_rel) and self.max_rel <= TRAJECTORY_RTOL


def _train_restored(module: torch.nn.Module, objective: Objective, batches: list[tuple[tuple, dict]],
                    lr: float) -> list[float]:
    """``train_losses`` on ``module`` itself, its state and gradients restored afterwards."""
    saved = {name: value.detach().clone() for name, value in module.state_dict().items()}
    try:
        return train_losses(module, objective, batches, lr)
    finally:
        with torch.no_grad():
            module.load_state_dict(saved)
        module.zero_grad(set_to_none=True)


GRADIENT_RTOL = 1e-4  # of each gradient's scale, floored at GRADIENT_FLOOR of the largest gradient
GRADIENT_FLOOR = 1e-3


def gradients(module: torch.nn.Module, objective: Objective, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Each trainable parameter's gradient (by name) from one backward of the objective at seed 0, as float32
    copies. Gradients are cleared before and after."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    objective(module, args, kwargs).backward()
    grads = {name: p.grad.detach().float().clone() for name, p in module.named_parameters()
             if p.requires_grad and p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def gradient_differences(original: dict[str, torch.Tensor], compiled: dict[str, torch.Tensor]) -> list[str]:
    """The parameters (present on both sides) whose compiled gradient differs from the original's by more
    than ``GRADIENT_RTOL`` of its scale (the largest |g|, floored at ``GRADIENT_FLOOR`` of the largest gradient
    of all, so round-off on a gradient that is zero in exact arithmetic is not a difference), each as
    ``name (rel X)``, largest first."""
    top = max((float(g.abs().max()) for g in original.values() if g.numel()), default=0.0)
    found = []
    for name, reference in original.items():
        candidate = compiled.get(name)
        if candidate is None or candidate.shape != reference.shape or not reference.numel():
            continue
        scale = max(float(reference.abs().max()), GRADIENT_FLOOR * top, 1e-12)
        rel = float((candidate - reference).abs().max()) / scale
        if not math.isfinite(rel) or rel > GRADIENT_RTOL:
            found.append((rel, name))
    return [f"{name} (rel {rel:.2g})" for rel, name in sorted(found, reverse=True)]


def trajectory(original: torch.nn.Module, compiled: torch.nn.Module, objective: Objective, args: tuple,
               kwargs: dict, steps: int = TRAJECTORY_STEPS, candidate_objective: Objective | None = None,
               lr: float = TRAJECTORY_LR) -> Trajectory:
    """Train ``original`` and ``compiled`` (each in place, its state restored afterwards: a deep copy of a
    model whose closures reach its submodules would train only part of itself) for ``steps`` AdamW steps on the same batches (``shifted_batches``) and compare the loss curves. Neither argument is
    changed."""
    batches = shifted_batches(args, kwargs, steps)
    reference = _train_restored(original, objective, batches, lr)
    candidate = _train_restored(compiled, candidate_objective or objective, batches, lr)
    max_rel = max((abs(a - b) / max(abs(a), 1e-6) for a, b in zip(reference, candidate)), default=0.0)
    if not all(math.isfinite(x) for x in reference + candidate):
        max_rel = math.inf
    return Trajectory(reference, candidate, max_rel)
