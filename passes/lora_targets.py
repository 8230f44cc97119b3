"""``lora``'s default targets: the attention projections the attention matcher finds, plus names.

An architecture's attention projections go by many names (``q_proj``, ``query``, T5's ``q``/``k``/``v``/``o``,
timm's ``qkv``, vit-pytorch's ``to_qkv``/``to_out``); a name list always misses some. The graph does not:
the linears whose outputs reach an attention's query, key or value (through reshapes, transposes, splits,
rotary embeddings, norms — stopping at the first linear) and the first linear reading its output are its
projections. The default targets are those plus the linears named in ``DEFAULT_TARGETS`` (kept so that
families without a matched attention — Mamba's ``in_proj``/``x_proj``/``out_proj`` — and defaults users know
— GPT-2's ``c_attn``/``c_proj`` by PEFT's suffix rule — stay as they were).

PEFT can only wrap ``nn.Linear``, ``nn.Conv*d``, ``nn.Embedding``, ``nn.MultiheadAttention`` and transformers'
``Conv1D``: a linear op another module computes with ``F.linear`` on its own weight (Mixtral's router
``MixtralTopKRouter``) gets an adapter here but an adapter folder naming it does not load in PEFT.
``peft_unsupported`` names the module class of such a site.
"""

from __future__ import annotations

import torch
import torch.fx

from effcompile.graph import bounded_walk, reads_only_shape
from effcompile.patterns import LinearSite, find_attention, find_linears

_SEARCH_DEPTH = 24  # nodes between a projection and the attention (rotary embeddings, norms, splits...)
# Module classes PEFT's LoRA wraps that can be linear sites (by class name, as nn_module_stack records them).
PEFT_LINEAR_CLASSES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Conv3d")


def attention_projections(gm: torch.fx.GraphModule) -> list[str]:
    """Module paths of the linears projecting into a found attention's query/key/value and out of its output,
    in graph order, without repeats."""
    linears = {site.node: site for site in find_linears(gm) if site.path}
    found: list[str] = []
    for attention in find_attention(gm):
        if attention.kind == "module":  # nn.MultiheadAttention: its projections live inside the module
            continue
        for start in (attention.query, attention.key, attention.value):
            found.extend(_linears_before(start, linears))
        found.extend(_linears_after(attention.node, linears))
    return list(dict.fromkeys(found))


def _linears_before(start: object, linears: dict[torch.fx.Node, LinearSite]) -> list[str]:
    """The linears feeding ``start`` (a query/key/value), each the first on its path back through at most
    ``_SEARCH_DEPTH`` ops."""
    if not isinstance(start, torch.fx.Node):
        return []
    if start in linears:
        return [linears[start].path]

    def sources(node: torch.fx.Node) -> list[torch.fx.Node]:
        # Not through an op that reads only a shape: ``view(B, T, ...)`` with ``B, T = x.size()`` would lead
        # from the query back through the norm into the previous layer's MLP.
        return [s for s in node.all_input_nodes if s.op not in ("placeholder", "get_attr") and not reads_only_shape(s)]

    return [linears[n].path for n in bounded_walk(start, sources, _SEARCH_DEPTH - 1, lambda n: n not in linears)
            if n in linears]


def _linears_after(output: torch.fx.Node, linears: dict[torch.fx.Node, LinearSite]) -> list[str]:
    """The first linear(s) reading the attention's output through reshapes (the output projection)."""
    for user in bounded_walk(output, lambda n: n.users, 8, lambda n: n not in linears):
        if user in linears:
            return [linears[user].path]
    return []


def peft_unsupported(site: LinearSite) -> str | None:
    """The class name of the module computing ``site`` when PEFT's LoRA cannot wrap it (e.g. a router calling
    ``F.linear`` on its own weight), else None (also when the graph does not record the class)."""
    stack = site.node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    if isinstance(kind, type) and issubclass(kind, torch.nn.Linear):
        return None
    return None if name in PEFT_LINEAR_CLASSES else name
