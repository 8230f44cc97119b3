"""Dtype propagation for ``amp``: run the graph once (no grad) on the example inputs and record each node's
dtype; while doing so, clamp scalar constants that a low-precision op cannot hold.

A constant fixed at capture in float32 — DeBERTa-v2's ``masked_fill(mask, finfo(float32).min)``, a
``where(mask, x, -3.4e38)`` — overflows when ``amp`` makes the op run in bfloat16/float16 (PyTorch raises
"value cannot be converted to type c10::BFloat16 without overflow"). Eager code under autocast reads
``finfo(x.dtype)`` at run time and gets the low dtype's extreme; the clamp does the same to the graph: a
finite Python float argument beyond ``finfo(low).max`` in magnitude becomes ``finfo(low).min``/``.max``,
where ``low`` is the narrowest floating dtype among the op's tensor inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

_LOW = (torch.bfloat16, torch.float16)


def clamp_scalar(value: Any, low: torch.dtype) -> Any:
    """``value`` clamped to ``low``'s finite range when it is a finite Python float outside it (infinities and
    everything else unchanged)."""
    if type(value) is not float or value != value or abs(value) == float("inf"):
        return value
    info = torch.finfo(low)
    return min(max(value, float(info.min)), float(info.max))


class DtypeRecorder(torch.fx.Interpreter):
    """Runs the graph, recording every node's dtype, the values of the nodes in ``keep`` and (by node name)
    the scalar constants it clamped to a low-precision op's range."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.dtypes: dict[torch.fx.Node, torch.dtype | None] = {}
        self.keep = keep
        self.values: dict[torch.fx.Node, Any] = {}
        self.clamped: dict[str, str] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        if node.op in ("call_function", "call_method"):
            self._clamp_constants(node)
        result = super().run_node(node)
        self.dtypes[node] = result.dtype if isinstance(result, torch.Tensor) else None
        if node in self.keep:
            self.values[node] = result
        return result

    def _clamp_constants(self, node: torch.fx.Node) -> None:
        """Rewrite ``node``'s out-of-range float arguments in place when it computes in bfloat16/float16."""
        lows = [self.dtypes.get(i) for i in node.all_input_nodes if self.dtypes.get(i) in _LOW]
        if not lows:
            return
        low = min(lows, key=lambda d: torch.finfo(d).max)  # float16's range is the narrower
        args = map_aggregate(node.args, lambda v: clamp_scalar(v, low))
        kwargs = map_aggregate(node.kwargs, lambda v: clamp_scalar(v, low))
        if args != node.args or kwargs != node.kwargs:
            before = [v for v in list(node.args) + list(node.kwargs.values()) if type(v) is float]
            node.args, node.kwargs = args, kwargs
            after = [v for v in list(node.args) + list(node.kwargs.values()) if type(v) is float]
            self.clamped[node.name] = ", ".join(f"{b:.4g} → {a:.4g}" for b, a in zip(before, after) if b != a)


def propagate_dtypes(program: Any, recompile: bool = False, keep: set[torch.fx.Node] | None = None
                     ) -> tuple[dict[torch.fx.Node, torch.dtype | None], dict[torch.fx.Node, Any], dict[str, str]]:
    """The dtype of every node's value (None for non-tensors), the values of the nodes in ``keep`` and the
    constants clamped (node name → ``before → after``), from one no-grad run of ``program`` (a Program) on
    its example inputs. Clamping rewrites the graph's nodes; the caller recompiles."""
    if recompile:
        program.gm.recompile()
    recorder = DtypeRecorder(program.gm, keep or set())
    torch.manual_seed(0)
    with torch.no_grad():
        recorder.run(*program.flat_inputs())
    return recorder.dtypes, recorder.values, recorder.clamped
