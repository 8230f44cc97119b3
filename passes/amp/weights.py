"""``amp`` with ``cast_params=once``: one low-precision copy per float32 weight, kept between forwards.

The float32 parameter stays the master copy that the optimizer updates; the module keeps a
low-precision copy of it and makes a new one only when the parameter changed (its version counter
moves — every in-place update does that: ``optimizer.step()``, ``load_state_dict``, ``copy_``).
Gradients flow to the float32 parameter (cast back to its dtype), so optimizers see float32 grads.
Gradient accumulation over micro-batches and evaluation loops then cast each weight once per
optimizer step instead of once per forward. Eager mode only: under ``torch.compile`` use
``per_step`` (the compiler fuses the casts anyway).
"""

from __future__ import annotations

from typing import Any

import torch

from effcompile.export.registry import serializable


class _CachedCast(torch.autograd.Function):
    """Forward: the cached low-precision copy; backward: the gradient cast to the weight's dtype."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.weight_dtype), None


@serializable(transient={"_copies": dict})
class LowPrecisionWeights(torch.nn.Module):
    """Holds the low-precision copies of float32 weights, keyed by the weight's attribute path.

    Called as ``weights(weight, "h.0.attn.c_attn.weight")``; returns a ``dtype`` tensor equal to
    ``weight.to(dtype)`` whose gradient reaches ``weight``. The copies are not part of the state dict.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._copies: dict[str, tuple[int, torch.Tensor]] = {}

    def forward(self, weight: torch.Tensor, key: str) -> torch.Tensor:
        entry = self._copies.get(key)
        version = weight._version
        if entry is None or entry[0] != version or entry[1].device != weight.device:
            with torch.no_grad():
                entry = (version, weight.detach().to(self.dtype))
            self._copies[key] = entry
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return entry[1]
        return _CachedCast.apply(weight, entry[1])

    def clear(self) -> None:
        """Drop every cached copy (frees their memory; the next forward makes new ones)."""
        self._copies.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_copies"] = {}
        return state

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, cached={len(self._copies)}"
