"""Linear-like ops (``LinearSite``): ``nn.Linear``/HF ``Conv1D`` modules, ``F.linear``/``aten.linear``, ``addmm`` and
``mm``/``matmul`` by a 2-D parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..graph import get_attr_value, module_path
from .ops import ADDMM_FUNCTIONS, LINEAR_FUNCTIONS, MM_FUNCTIONS


@dataclass
class LinearSite:
    """One linear-like op. ``weight_layout`` is ``"out_in"`` (nn.Linear) or ``"in_out"`` (Conv1D/addmm/mm)."""

    node: torch.fx.Node
    kind: str  # "module" | "linear" | "addmm" | "mm"
    path: str  # module path, e.g. "transformer.h.0.attn.c_attn"
    weight_target: str
    bias_target: str | None
    in_features: int
    out_features: int
    weight_layout: str
    input: torch.fx.Node

    @property
    def module_name(self) -> str:
        """The last component of the path (``c_attn``, ``q_proj``)."""
        return self.path.rsplit(".", 1)[-1]


def _param(gm: torch.fx.GraphModule, node: Any) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            return str(node.target), value
    return None


def find_linears(gm: torch.fx.GraphModule) -> list[LinearSite]:
    """Every linear-like op in ``gm``, in graph order."""
    sites: list[LinearSite] = []
    for node in gm.graph.nodes:
        site = _match_linear(gm, node)
        if site is not None:
            sites.append(site)
    return sites


def _match_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        name = type(module).__name__
        if isinstance(module, torch.nn.Linear):
            bias = f"{node.target}.bias" if module.bias is not None else None
            return LinearSite(node, "module", str(node.target), f"{node.target}.weight", bias,
                              module.in_features, module.out_features, "out_in", node.args[0])
        if name == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            in_features, out_features = module.weight.shape
            return LinearSite(node, "module", str(node.target), f"{node.target}.weight", f"{node.target}.bias",
                              in_features, out_features, "in_out", node.args[0])
        return None
    if node.op != "call_function":
        return None
    if node.target in LINEAR_FUNCTIONS:
        weight = _param(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if weight is None or weight[1].dim() != 2:
            return None
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = _param(gm, bias_arg)
        out_features, in_features = weight[1].shape
        return LinearSite(node, "linear", _owner(weight[0], node), weight[0], bias[0] if bias else None,
                          in_features, out_features, "out_in", node.args[0])
    if node.target in ADDMM_FUNCTIONS and len(node.args) >= 3:
        weight, bias = _param(gm, node.args[2]), _param(gm, node.args[0])
        if weight is None or weight[1].dim() != 2 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        in_features, out_features = weight[1].shape
        return LinearSite(node, "addmm", _owner(weight[0], node), weight[0], bias[0] if bias else None,
                          in_features, out_features, "in_out", node.args[1])
    if node.target in MM_FUNCTIONS and len(node.args) == 2:
        weight = _param(gm, node.args[1])
        if weight is None or weight[1].dim() != 2 or _param(gm, node.args[0]) is not None:
            return None
        in_features, out_features = weight[1].shape
        return LinearSite(node, "mm", _owner(weight[0], node), weight[0], None, in_features, out_features,
                          "in_out", node.args[0])
    return None


def _owner(weight_target: str, node: torch.fx.Node) -> str:
    owner = weight_target.rpartition(".")[0]
    return owner or module_path(node)
