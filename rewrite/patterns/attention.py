"""Attention (``AttentionSite``): SDPA calls, the explicit matmul-softmax-matmul form (heads in the batch or not),
``nn.MultiheadAttention`` calls; for each candidate that did not match, why."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..graph import module_path, reads_only_shape
from .ops import MATMUL_FUNCTIONS, SDPA_FUNCTIONS, SOFTMAX_FUNCTIONS, NoMatch, aten

# Ops allowed between the score matmul and the softmax, and between the softmax and the value matmul.
_SCORE_OPS = {operator.mul, operator.truediv, operator.add, torch.mul, torch.div, torch.add, aten.mul.Tensor,
              aten.div.Tensor, aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
              torch.masked_fill, aten.to.dtype, aten._to_copy.default, aten.where.self, torch.where}
_SCORE_METHODS = {"masked_fill", "to", "float", "type_as", "mul", "div", "add", "masked_fill_"}
_PROB_OPS = {F.dropout, aten.dropout.default, aten.native_dropout.default, aten.to.dtype, aten._to_copy.default,
             operator.getitem, aten.clone.default}
_PROB_METHODS = {"to", "type_as", "half", "float", "bfloat16"}
# Reshapes (a view when the strides allow) and transposes, as functions; method calls are matched by name.
VIEW_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape})
TRANSPOSE_OPS = frozenset({aten.transpose.int, aten.permute.default, aten.t.default, torch.transpose, torch.permute})


@dataclass
class AttentionSite:
    """One attention. For ``kind == "explicit"`` ``nodes`` lists the matched nodes, output last;
    ``heads_in_batch`` > 0 for the ``bmm`` form (query/key/value ``[B·H, S, D]``, scores viewed as
    ``[B, H, Sq, Sk]``). ``kind == "module"``: an ``nn.MultiheadAttention`` call (query/key/value are its inputs)."""

    kind: str  # "sdpa" | "explicit" | "module"
    node: torch.fx.Node  # the node producing the attention output
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    path: str
    attn_mask: Any = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    nodes: list[torch.fx.Node] = field(default_factory=list)
    heads_in_batch: int = 0
    module_target: str | None = None



def find_attention(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every attention in ``gm`` (SDPA calls, the explicit matmul-softmax-matmul form including the ``bmm``
    form with heads folded into the batch, ``nn.MultiheadAttention`` calls), in graph order."""
    return match_attention(gm)[0]


def match_attention(gm: torch.fx.GraphModule) -> tuple[list[AttentionSite], list[NoMatch]]:
    """Every attention candidate of ``gm`` (each SDPA call, softmax, and ``nn.MultiheadAttention`` call), in
    graph order: the matched sites, and for each candidate that did not match, why (naming the node)."""
    sites: list[AttentionSite] = []
    misses: list[NoMatch] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_FUNCTIONS:
            result: AttentionSite | str = _sdpa_site(node)
        elif is_softmax(node):
            result = _explicit_site(node)
        elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), torch.nn.MultiheadAttention):
            result = _module_site(gm, node)
        else:
            continue
        if isinstance(result, str):
            misses.append(NoMatch(node, result))
        else:
            sites.append(result)
    return sites, misses


def _sdpa_site(node: torch.fx.Node) -> AttentionSite:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                "enable_gqa": False}
    values = dict(defaults)
    values.update(dict(zip(names, node.args)))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return AttentionSite("sdpa", node, values["query"], values["key"], values["value"], module_path(node),
                         values["attn_mask"], float(values["dropout_p"]), bool(values["is_causal"]),
                         values["scale"], bool(values["enable_gqa"]), [node])


def is_softmax(node: torch.fx.Node) -> bool:
    """True for a softmax call (``torch.softmax``, ``F.softmax``, ``aten._softmax``/``softmax.int``, ``x.softmax()``)."""
    return (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS) or \
        (node.op == "call_method" and node.target == "softmax")


def _is_matmul(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_function" and node.target in MATMUL_FUNCTIONS)
        or (node.op == "call_method" and node.target in ("matmul", "bmm")))


def _is_view(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and ((node.op == "call_function" and node.target in VIEW_OPS)
                                                or (node.op == "call_method" and node.target in ("view", "reshape")))


# Nodes export adds that only check a tensor's dtype/shape or a size's range; they compute nothing.
ASSERTION_OPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def _real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that compute something from the values (export adds dtype/shape assertion nodes that only check;
    ``size()`` calls read the shape only)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in ASSERTION_OPS) and not reads_only_shape(u)]


def _score_path(start: Any, depth: int = 10) -> tuple[list[torch.fx.Node] | None, Any]:
    """Nodes from the softmax input back to the score matmul through scale/mask/cast/view ops (matmul last),
    or None and the node where the chain broke."""
    if not isinstance(start, torch.fx.Node) or depth < 0:
        return None, start
    if _is_matmul(start):
        return [start], None
    allowed = (start.op == "call_function" and start.target in _SCORE_OPS) or \
        (start.op == "call_method" and start.target in _SCORE_METHODS) or _is_view(start)
    if not allowed:
        return None, start
    broke: Any = start
    for source in start.args[:1] if _is_view(start) else start.args:  # where(cond, scores, fill): scores second
        path, broke_at = _score_path(source, depth - 1)
        if path is not None:
            return [start, *path], None
        if isinstance(broke_at, torch.fx.Node):
            broke = broke_at
    return None, broke


def _describe(node: Any) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _explicit_site(softmax: torch.fx.Node) -> AttentionSite | str:
    """The explicit attention around ``softmax``, or why it is not one."""
    source = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    path, broke = _score_path(source)
    if path is None:
        return (f"softmax {softmax.name}: its input is not a score matmul reached through scale/mask/cast/view "
                f"ops (the chain stops at {_describe(broke)})")
    score = path[-1]
    nodes = [score, *reversed(path[:-1]), softmax]  # graph order: score matmul first
    probs = softmax
    while True:
        users = _real_users(probs)
        if len(users) != 1:
            return f"softmax {softmax.name}: the probabilities at {probs.name} have {len(users)} users, not one value matmul"
        user = users[0]
        if _is_matmul(user):
            if user.args[0] is not probs:
                return f"softmax {softmax.name}: the probabilities are the second operand of {_describe(user)}"
            nodes.append(user)
            break
        allowed = (user.op == "call_function" and user.target in _PROB_OPS) or \
            (user.op == "call_method" and user.target in _PROB_METHODS) or _is_view(user)
        if not allowed:
            return f"softmax {softmax.name}: unsupported op {_describe(user)} between the softmax and the value matmul"
        nodes.append(user)
        probs = user
    heads = _folded_heads(nodes)
    if isinstance(heads, str):
        return f"softmax {softmax.name}: {heads}"
    mask = None
    for node in path[:-1]:
        if node.target in (operator.add, torch.add, aten.add.Tensor, "add") and len(node.args) > 1:
            mask = node.args[1]
    return AttentionSite("explicit", user, score.args[0], score.args[1], user.args[1], module_path(user), mask,
                         nodes=nodes, heads_in_batch=heads)


def _folded_heads(nodes: list[torch.fx.Node]) -> int | str:
    """0 without views; for ``bmm → view → … → view → bmm`` (heads folded into the batch) the head count,
    read from the view of the scores to ``[B, H, Sq, Sk]``; or why the views are not that."""
    views = [n for n in nodes if _is_view(n)]
    if not views:
        return 0
    shapes = [_view_shape(v) for v in views]
    four_d = [s for s in shapes if s is not None and len(s) == 4]
    if len(views) != 2 or len(four_d) != 1 or _view_shape(views[1]) is None or len(_view_shape(views[1]) or ()) != 3:
        return (f"views {', '.join(v.name for v in views)} are not the bmm form's scores → [B, H, Sq, Sk] and "
                "probabilities → [B·H, Sq, Sk]")
    heads = four_d[0][1]
    if isinstance(heads, torch.SymInt) or not isinstance(heads, int) or heads < 1:
        return f"the view {views[0].name} does not give the head count as a constant"
    return heads


def _view_shape(node: torch.fx.Node) -> tuple | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        args = node.args[1:] if node.op == "call_method" else node.args[1:2]
        given = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else tuple(args)
        # The head count as written in the graph (the meta shape may be symbolic in the batch).
        return tuple(g if isinstance(g, int) and g > 0 else s for g, s in zip(given, shape)) if len(given) == len(shape) \
            else shape
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = tuple(args[0])
    return tuple(args) if args else None


def _module_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> AttentionSite | str:
    """An ``nn.MultiheadAttention`` call (a leaf under symbolic_trace), or why it cannot be rewritten."""
    module = gm.get_submodule(str(node.target))
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    values: dict[str, Any] = dict(zip(names, node.args))
    values.update(node.kwargs)
    where = f"nn.MultiheadAttention call {node.name}"
    for name in ("key_padding_mask", "attn_mask"):
        if values.get(name) is not None:
            return f"{where} passes {name}; only unmasked calls are rewritten (use SDPA in the model for masks)"
    if values.get("is_causal"):
        return f"{where} passes is_causal=True; only unmasked calls are rewritten"
    if module.bias_k is not None or module.add_zero_attn:
        return f"{where}: add_bias_kv / add_zero_attn are not supported"
    for user in _real_users(node):
        if user.target is not operator.getitem:
            return f"{where}: its output tuple is used whole ({user.name}), not through output[0]"
        if user.args[1] != 0 and _real_users(user):
            return f"{where}: the attention weights (output 1) are used at {_real_users(user)[0].name}"
    return AttentionSite("module", node, values["query"], values["key"], values["value"], str(node.target),
                         dropout_p=float(module.dropout), nodes=[node], module_target=str(node.target))

