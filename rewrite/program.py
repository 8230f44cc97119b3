"""The one object passes read and write: a GraphModule, its example inputs, its loss and metadata."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx
from torch.utils import _pytree as pytree

LossFn = Callable[..., torch.Tensor]
T = TypeVar("T")


@dataclass
class Program:
    """A captured model on its way down the road.

    Attributes:
        gm: the trainable GraphModule; called like the original model.
        args: positional example inputs.
        kwargs: keyword example inputs.
        loss_fn: ``loss_fn(output, *args, **kwargs) -> scalar`` or None (then the output's ``loss``
            field, if any, is the objective).
        capture_path: ``"symbolic_trace"`` or ``"export"``.
        name: a human name for the model (file name or ``hf:<type>``).
        meta: free-form metadata (capture counts, the fallback reason).
        plans: the state passes leave for later consumers, one typed object per kind, keyed by its type
            (``program.plan(PipelinePlan)``); see ``plan`` / ``set_plan``.
    """

    gm: torch.fx.GraphModule
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    loss_fn: LossFn | None = None
    capture_path: str = "symbolic_trace"
    name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)
    plans: dict[type, Any] = field(default_factory=dict)

    def plan(self, kind: type[T]) -> T | None:
        """The plan of type ``kind`` a pass left on this program, or None."""
        return self.plans.get(kind)

    def set_plan(self, plan: Any) -> None:
        """Store ``plan`` under its type, replacing any plan of that type."""
        self.plans[type(plan)] = plan

    def clone(self) -> Program:
        """Return a deep copy whose GraphModule and parameters are independent of this one. The metadata
        and plans are copied in the same deep copy, so a plan that refers to the program's modules (the
        pipeline's stage GraphModules) refers to the clone's."""
        memo: dict[int, Any] = {}
        gm = copy.deepcopy(self.gm, memo)
        return Program(gm, self.args, dict(self.kwargs), self.loss_fn, self.capture_path, self.name,
                       copy.deepcopy(self.meta, memo), copy.deepcopy(self.plans, memo))

    def run(self, module: torch.nn.Module | None = None) -> Any:
        """Call ``module`` (default: this program's GraphModule) on the example inputs."""
        module = self.gm if module is None else module
        return module(*self.args, **self.kwargs)

    def flat_inputs(self) -> list[Any]:
        """The example inputs in the order of the graph's placeholders.

        Export-captured graphs take the pytree-flattened ``(args, kwargs)``; symbolically traced ones
        take the forward's parameters by name.
        """
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if self.capture_path == "export":
            flat, _ = pytree.tree_flatten((self.args, self.kwargs))
            if len(flat) == len(placeholders):
                return flat
        signature = inspect.signature(self.gm.forward)
        bound = signature.bind(*self.args, **self.kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.values())
        if len(values) != len(placeholders):
            raise RuntimeError(f"{len(values)} inputs for {len(placeholders)} placeholders")
        return values

    def objective(self, output: Any) -> torch.Tensor:
        """The scalar that training minimises: ``loss_fn``, else the output's ``loss``, else a fixed
        random projection of every floating-point output (deterministic, so two runs compare)."""
        if self.loss_fn is not None:
            return self.loss_fn(output, *self.args, **self.kwargs)
        loss = loss_field(output)
        if loss is not None:
            return loss
        leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not leaves:
            raise RuntimeError("the model's output holds no floating-point tensor to differentiate")
        generator = torch.Generator().manual_seed(1234)
        total = torch.zeros((), device=leaves[0].device)
        for leaf in leaves:
            weight = torch.randn(leaf.shape, generator=generator).to(leaf.device, torch.float32)
            total = total + (leaf.float() * weight).sum() / max(leaf.numel(), 1)
        return total

    def has_loss(self) -> bool:
        """True when the objective is a real loss (loss_fn or a ``loss`` output), not a projection."""
        if self.loss_fn is not None:
            return True
        with torch.no_grad():
            return loss_field(self.run()) is not None


def loss_field(output: Any) -> torch.Tensor | None:
    """The model output's scalar ``loss`` (``output["loss"]`` or ``output.loss``), or None."""
    if isinstance(output, torch.Tensor):
        return None
    try:
        loss = output["loss"]
    except (KeyError, TypeError, IndexError):
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None
