"""The op sets the matchers recognise (functional, ``aten`` and method forms), and ``NoMatch``: why a candidate
did not match."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

aten = torch.ops.aten

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
DTYPE_CONVERSIONS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}  # x.to(dtype) in ATen form
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
MM_FUNCTIONS = {torch.mm, aten.mm.default, torch.matmul, operator.matmul, aten.matmul.default}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default}
SDPA_FUNCTIONS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, aten._softmax.default, aten.softmax.int, torch.Tensor.softmax}


@dataclass
class NoMatch:
    """Why a candidate did not match: the node where the pattern broke and the reason, in words."""

    node: torch.fx.Node | None
    reason: str

    def describe(self) -> str:
        """``"<node>: <reason>"`` for reports."""
        return f"{self.node.name}: {self.reason}" if self.node is not None else self.reason
