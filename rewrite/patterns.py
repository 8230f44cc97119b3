"""The shared matcher: find linear-like ops and attention in a captured graph, whichever capture path
made it. Passes ask here; none walks the graph for these patterns itself.

Linear-like (``LinearSite``):
  1. ``call_module`` of ``nn.Linear`` (weight ``[out, in]``) or Hugging Face ``Conv1D`` (``[in, out]``);
  2. ``F.linear`` / ``aten.linear`` with a parameter weight (``[out, in]``);
  3. ``torch.addmm`` / ``aten.addmm`` (bias, x, W) with a parameter W (``[in, out]``, HF Conv1D exported);
  4. ``torch.mm`` / ``aten.mm`` / ``matmul`` of an activation by a 2-D parameter (``[in, out]``).
Attention (``AttentionSite``):
  1. ``scaled_dot_product_attention`` (functional or ``aten``);
  2. explicit ``matmul(q, kᵀ) → [scale] → [+ mask] → softmax → [dropout] → matmul(·, v)``, also with the
     heads folded into the batch (``bmm → [+ bias] → view → … → softmax → … → view → bmm``, DeBERTa);
  3. ``nn.MultiheadAttention`` called as a module (a leaf under symbolic_trace, torchvision's ViT).
``match_attention`` also says, for each candidate that did not match, why (naming the node).
Loss heads (``HeadSite``, ``match_loss_head``; shared by ``remat``'s chunked head and ``fuse``'s fused
linear + cross-entropy): ``linear → [views, one float cast, leading slices] → cross_entropy``.
Matchers that can fail say why (``NoMatch``: the node where the pattern broke and the reason).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from .graph import get_attr_value, module_path, reads_only_shape

aten = torch.ops.aten

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
DTYPE_CONVERSIONS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}  # x.to(dtype) in ATen form
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
MM_FUNCTIONS = {torch.mm, aten.mm.default, torch.matmul, operator.matmul, aten.matmul.default}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default}
SDPA_FUNCTIONS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, aten._softmax.default, aten.softmax.int, torch.Tensor.softmax}
# Ops allowed between the score matmul and the softmax, and between the softmax and the value matmul.
_SCORE_OPS = {operator.mul, operator.truediv, operator.add, torch.mul, torch.div, torch.add, aten.mul.Tensor,
              aten.div.Tensor, aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
              torch.masked_fill, aten.to.dtype, aten._to_copy.default, aten.where.self, torch.where}
_SCORE_METHODS = {"masked_fill", "to", "float", "type_as", "mul", "div", "add", "masked_fill_"}
_PROB_OPS = {F.dropout, aten.dropout.default, aten.native_dropout.default, aten.to.dtype, aten._to_copy.default,
             operator.getitem, aten.clone.default}
_PROB_METHODS = {"to", "type_as", "half", "float", "bfloat16"}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}


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
    return isinstance(node, torch.fx.Node) and ((node.op == "call_function" and node.target in _VIEW_OPS)
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


# ------------------------------------------------------------------------------------- loss heads and misses

@dataclass
class NoMatch:
    """Why a candidate did not match: the node where the pattern broke and the reason, in words."""

    node: torch.fx.Node | None
    reason: str

    def describe(self) -> str:
        """``"<node>: <reason>"`` for reports."""
        return f"{self.node.name}: {self.reason}" if self.node is not None else self.reason


@dataclass
class HeadSite:
    """One matched loss head (``linear → [views, casts, leading slices] → cross_entropy``).

    ``chain`` lists the nodes between the linear and the loss (the linear's user first); ``weight``/``bias`` are
    nodes or, for an ``nn.Linear`` call_module, the parameter targets to fetch; ``slices`` are leading-dim
    slices of the logits (they commute with the linear, so they can move onto ``h``); ``reduction`` uses
    aten's codes (0 none, 1 mean, 2 sum); ``upcast`` is the floating dtype the logits were cast to, if any."""

    linear: torch.fx.Node
    loss: torch.fx.Node
    chain: list[torch.fx.Node]
    h: torch.fx.Node
    weight: torch.fx.Node | str
    bias: torch.fx.Node | str | None
    target: Any
    ignore_index: int
    reduction: int
    upcast: torch.dtype | None
    slices: list[torch.fx.Node]

    @property
    def name(self) -> str:
        """The head's module path (or the linear node's name), for reports."""
        if isinstance(self.weight, str):
            return self.weight.rsplit(".", 1)[0]
        return module_path(self.linear) or self.linear.name


HEAD_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
              aten.clone.default, torch.reshape, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous}
HEAD_VIEW_METHODS = {"view", "reshape", "contiguous"}
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _is(node: Any, targets: set, methods: set[str] = frozenset()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


def cross_entropy_options(node: torch.fx.Node) -> tuple[Any, Any, int, int] | str | None:
    """``(input, target, ignore_index, reduction)`` of a plain cross-entropy call; a reason (str) for a
    cross-entropy with options a fused head does not support; None when ``node`` is no cross-entropy."""
    if node.op != "call_function":
        return None
    if node.target is aten.cross_entropy_loss.default:
        names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
        values = {"weight": None, "reduction": 1, "ignore_index": -100, "label_smoothing": 0.0}
        values.update(dict(zip(names, node.args)))
        values.update(node.kwargs)
        reduction = values["reduction"]
    elif node.target is F.cross_entropy:
        names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
        values = {"weight": None, "size_average": None, "reduce": None, "ignore_index": -100, "reduction": "mean",
                  "label_smoothing": 0.0}
        values.update(dict(zip(names, node.args)))
        values.update(node.kwargs)
        if values["size_average"] is not None or values["reduce"] is not None:
            return "legacy size_average/reduce arguments"
        reduction = _REDUCTIONS.get(values["reduction"], -1)
    else:
        return None
    if values["weight"] is not None:
        return "class weights"
    if values["label_smoothing"] not in (0, 0.0):
        return "label smoothing"
    if reduction not in (0, 1, 2) or not isinstance(values["ignore_index"], int):
        return "a reduction or ignore_index that is not a constant"
    return values["input"], values["target"], values["ignore_index"], reduction


def float_cast(node: torch.fx.Node) -> torch.dtype | bool:
    """The floating dtype a pure cast node converts to; False when ``node`` is not such a cast."""
    if node.op == "call_method" and node.target == "float":
        return torch.float32
    if node.op == "call_method" and node.target == "to":
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    elif node.op == "call_function" and node.target in DTYPE_CONVERSIONS:
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
        if set(node.kwargs) - {"dtype", "layout", "device", "memory_format", "copy"}:
            return False
    else:
        return False
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else False


def node_rank(node: Any) -> int | None:
    """The tensor rank recorded on a node (export's ``val`` or ShapeProp's ``tensor_meta``), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return len(shape) if shape is not None else None


def _leading_slice(node: torch.fx.Node) -> bool:
    """A slice of a dimension other than the last (it commutes with the linear): ``aten.slice(x, dim, ...)``
    or ``x[a:b, c:d]`` (slices only), on a node whose rank is recorded."""
    rank = node_rank(node.args[0]) if node.args else None
    if rank is None or node.op != "call_function":
        return False
    if node.target is aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return isinstance(dim, int) and -rank <= dim < rank and dim % rank != rank - 1
    if node.target is operator.getitem and len(node.args) == 2:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not index or not all(isinstance(i, slice) for i in index) or len(index) > rank:
            return False
        return len(index) < rank or index[-1] == slice(None)
    return False


def _linear_parts(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Any, Any, Any] | None:
    """``(h, weight, bias)`` of a linear over the last dimension, else None."""
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        h = node.args[0]
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return (h, weight, bias) if isinstance(weight, torch.fx.Node) else None
    if node.op == "call_module" and not node.kwargs and len(node.args) == 1:
        module = gm.get_submodule(str(node.target))
        if type(module) is torch.nn.Linear:
            return node.args[0], f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None
    return None


def match_loss_head(gm: torch.fx.GraphModule, node: torch.fx.Node) -> HeadSite | NoMatch | None:
    """The linear + cross-entropy loss head ending at ``node`` (a cross-entropy call), a ``NoMatch`` naming
    where the chain broke, or None when ``node`` is no cross-entropy.

    The cross-entropy (``aten.cross_entropy_loss`` or ``F.cross_entropy``; no class weights, no label
    smoothing) must reach back, through single-use views, one float cast and leading-dim slices, to a linear
    over the last dimension (``aten.linear``, ``F.linear`` or an ``nn.Linear`` module)."""
    options = cross_entropy_options(node)
    if options is None:
        return None
    if isinstance(options, str):
        return NoMatch(node, f"cross-entropy with {options}")
    scores, target, ignore_index, reduction = options
    chain: list[torch.fx.Node] = []
    upcast: torch.dtype | None = None
    slices: list[torch.fx.Node] = []
    current = scores
    while isinstance(current, torch.fx.Node):
        parts = _linear_parts(gm, current)
        if parts is not None:
            h, weight, bias = parts
            if not isinstance(h, torch.fx.Node):
                return NoMatch(current, "the linear's input is not a graph value")
            return HeadSite(current, node, list(reversed(chain)), h, weight, bias, target, ignore_index, reduction,
                            upcast, list(reversed(slices)))
        if len(current.users) != 1:
            return NoMatch(current, "the logits are also used elsewhere before the loss (not a plain view chain)")
        cast = float_cast(current)
        if cast is not False:
            if upcast is not None:
                return NoMatch(current, "two casts between the linear and the loss")
            upcast = cast
        elif _leading_slice(current):
            slices.append(current)
        elif not _is(current, HEAD_VIEWS, HEAD_VIEW_METHODS):
            return NoMatch(current, f"{current.name} ({current.target}) between the linear and the loss is not a "
                                    "view, cast or leading slice")
        chain.append(current)
        current = current.args[0] if current.args else None
    return NoMatch(node, "the loss input does not come from a linear")


def find_loss_heads(gm: torch.fx.GraphModule, misses: list[NoMatch] | None = None) -> list[HeadSite]:
    """Every linear + cross-entropy loss head of ``gm`` (see ``match_loss_head``), in graph order; the
    cross-entropies that did not match are appended to ``misses`` when given."""
    sites: list[HeadSite] = []
    for node in gm.graph.nodes:
        match = match_loss_head(gm, node)
        if isinstance(match, HeadSite):
            sites.append(match)
        elif isinstance(match, NoMatch) and misses is not None:
            misses.append(match)
    return sites
