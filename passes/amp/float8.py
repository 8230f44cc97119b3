"""``amp`` with ``dtype=float8``: the large linears train in float8 through torchao (``Float8Linear``, dynamic
tensorwise or rowwise scaling); everything else is ``amp``'s bf16.

1. Refuse (``OptionError``, exit 2) without a Hopper-or-newer CUDA GPU and torchao (float8 GEMMs need
   ``torch._scaled_mm`` on sm_89+/sm_90; torchao ≥ 0.17 is built for torch 2.11).
2. Choose: every linear site the shared matcher finds (``aten.linear``, ``F.linear``, ``nn.Linear``) is
   kept in bf16 or made float8 by ``effcompile.analysis.float8_gemm_choice`` (first/last linear, GEMMs
   narrower than ``float8_min_dim``, dimensions not divisible by 16 stay bf16); the record lists each
   decision and why.
3. Swap: a chosen site's weight (and bias) — the same Parameter objects, under the same names — move into a
   ``torchao.float8.Float8Linear`` installed at the site's module path, and the node calls it. The module
   says ``low_precision_ok``, so ``amp`` feeds it bf16 activations; it casts its float32 master weight to
   float8 itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from effcompile.analysis import float8_gemm_choice
from effcompile.export.registry import UNSAVEABLE
from effcompile.graph import get_attr_value, set_submodule
from effcompile.patterns import find_linears

# torchao's Float8Linear keeps its scaling recipe as config objects and its casts as code: not data the safe
# module format stores, so saving refuses it with this message (float8 is CUDA-only; nothing checks it here).
UNSAVEABLE_REASON = ("amp dtype=float8 installs torchao Float8Linear modules, which a saved folder cannot store "
                     "as data; train the float8 model in the process that compiles it (`effcompile train MODEL "
                     "--passes ...,amp --set amp.dtype=float8`), or save it compiled without amp.dtype=float8")


def float8_requirement() -> str | None:
    """Why float8 training cannot run here (None if it can)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return "a Hopper-or-newer CUDA GPU (sm_90+)"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao ≥ 0.17 (pip install 'effcompile[float8]')"
    return None


def swap_float8_linears(gm: torch.fx.GraphModule, recipe: str, min_dim: int) -> dict[str, str]:
    """Replace the linears ``float8_gemm_choice`` accepts by torchao ``Float8Linear`` modules (``recipe``:
    ``tensorwise`` or ``rowwise``). Returns ``{module path: decision}`` for every linear site."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(recipe)
    sites = [s for s in find_linears(gm) if s.weight_layout == "out_in" and s.kind in ("module", "linear")]
    decisions: dict[str, str] = {}
    for index, site in enumerate(sites):
        use, why = float8_gemm_choice(site.in_features, site.out_features, index == 0, index == len(sites) - 1,
                                      min_dim)
        owner = site.weight_target.rpartition(".")[0]
        if use and (not owner or site.weight_target != f"{owner}.weight"):
            use, why = False, "weight is not a module's .weight"
        decisions[site.path or site.node.name] = f"float8 ({recipe}): {why}" if use else f"bf16: {why}"
        if not use:
            continue
        weight = get_attr_value(gm, site.weight_target)
        bias = get_attr_value(gm, site.bias_target) if site.bias_target else None
        shell = torch.nn.Linear(site.in_features, site.out_features, bias=bias is not None, device="meta")
        shell.weight, shell.bias = weight, bias
        module = Float8Linear.from_float(shell, config=config)
        module.low_precision_ok = True
        setattr(module, UNSAVEABLE, UNSAVEABLE_REASON)
        set_submodule(gm, owner, module)
        _call_module(gm, site.node, owner, site.input)
    return decisions


def _call_module(gm: torch.fx.GraphModule, node: torch.fx.Node, target: str, x: Any) -> None:
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(target, (x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
