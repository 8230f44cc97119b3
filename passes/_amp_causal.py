"""Give SDPA calls that carry a materialised causal mask ``is_causal=True`` instead (exact).

Captured Hugging Face graphs build the causal mask as a boolean tensor (tracing turns off the
"mask is plain causal, pass None" shortcut that eager mode takes), and SDPA with an explicit mask
cannot use the flash kernel — the fastest one in bfloat16/float16. A mask qualifies when

1. it is computed from shapes only: no graph input reaches it except through ``sym_size`` /
   ``size`` / ``.shape`` (so it is the same for every batch of the same length), and
2. on the example inputs it is boolean ``[..., L, L]`` and equals ``tril(ones(L, L))`` everywhere,
   which is what ``is_causal=True`` means (top-left aligned).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from effcompile.graph import depends_on_input_data
from effcompile.patterns import find_attention

aten = torch.ops.aten


def causal_mask_candidates(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(sdpa node, mask node) pairs whose mask depends on the inputs' shapes only."""
    pairs = []
    for site in find_attention(gm):
        mask = site.attn_mask
        if site.kind != "sdpa" or site.is_causal or not isinstance(mask, torch.fx.Node):
            continue
        if not depends_on_input_data(mask):
            pairs.append((site.node, mask))
    return pairs


def is_causal_value(mask: Any) -> bool:
    """True if ``mask`` is a boolean ``[..., L, L]`` tensor equal to the lower triangle everywhere."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        return False
    rows, columns = mask.shape[-2:]
    if rows != columns:
        return False
    causal = torch.ones(rows, columns, dtype=torch.bool, device=mask.device).tril()
    return bool((mask == causal).all())


def set_causal(sdpa: torch.fx.Node) -> None:
    """Drop ``sdpa``'s mask argument and set ``is_causal=True`` (other arguments kept)."""
    args = list(sdpa.args)
    kwargs = dict(sdpa.kwargs)
    if len(args) > 3:
        args[3] = None
    kwargs.pop("attn_mask", None)
    if len(args) > 5:
        args[5] = True
    else:
        kwargs["is_causal"] = True
    sdpa.args, sdpa.kwargs = tuple(args), kwargs
