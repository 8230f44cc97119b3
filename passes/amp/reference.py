"""``amp``'s comparison with ``torch.autocast``: the float32 program run under autocast (the reference) and the
rewritten program's error against it (recorded in ``details["autocast"]``)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

from effcompile.program import Program

log = logging.getLogger("effcompile.passes.amp")


def autocast_reference(program: Program, low: torch.dtype) -> tuple[list[torch.Tensor], float | None] | None:
    """Outputs and objective of the (float32) program under ``torch.autocast`` (no grad, seed 0)."""
    device = next((t.device for t in list(program.gm.parameters()) + pytree.tree_leaves(program.args)
                   if isinstance(t, torch.Tensor)), torch.device("cpu"))
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=low):
            return _forward(program)
    except Exception as error:  # autocast may not support this dtype on this device: report, don't fail
        log.info("amp: autocast reference failed: %s", error)
        return None


def _forward(program: Program) -> tuple[list[torch.Tensor], float | None]:
    torch.manual_seed(0)
    output = program.run()
    leaves = [t.detach().float() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    try:
        objective = float(program.objective(output))
    except Exception:  # no objective: compare outputs only
        objective = None
    return leaves, objective


def compare_to_reference(program: Program, reference: tuple[list[torch.Tensor], float | None]) -> dict[str, Any]:
    """Max relative output error (max|a-b| / max|b|) and losses of the rewritten program vs autocast."""
    with torch.no_grad():
        leaves, objective = _forward(program)
    worst = 0.0
    for new, ref in zip(leaves, reference[0]):
        if new.shape == ref.shape and ref.numel():
            scale = float(ref.abs().max())
            worst = max(worst, float((new - ref).abs().max()) / (scale if scale > 0 else 1.0))
    return {"output_max_rel": worst if math.isfinite(worst) else str(worst), "loss_autocast": reference[1],
            "loss_amp": objective}
