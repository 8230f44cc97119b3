"""Loss heads (``HeadSite``): ``linear → [views, one float cast, leading slices] → cross_entropy``, shared by
``remat``'s chunked head and ``fuse``'s fused linear + cross-entropy."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..graph import module_path
from .ops import DTYPE_CONVERSIONS, LINEAR_FUNCTIONS, NoMatch, aten


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
