"""Find the subgraphs ``fuse`` replaces, by graph pattern, in ATen (exported) and torch-level (symbolically
traced) graphs alike; each matcher returns its sites and the candidates that did not match, with the reason.

Ops are compared by name (``effcompile.graph.op_name``: ``aten.pow.Tensor_Scalar``, ``torch.pow`` and
``x.pow`` are all ``pow``). A site's ``nodes`` are the matched nodes; ``output`` is the node whose uses the
fused call takes over (the rest die with it unless something else reads them).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from effcompile.graph import get_attr_value, module_path, op_name
from effcompile.patterns import NoMatch, float_cast, node_rank

aten = torch.ops.aten
_BIG = 2**62  # slice ends at least this large mean "to the end"


@dataclass
class Site:
    """One fusable subgraph: its kind, the node it replaces, the fused call's arguments and the module path."""

    kind: str
    output: torch.fx.Node
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    nodes: list[torch.fx.Node] = field(default_factory=list)
    path: str = ""
    extra_outputs: tuple[torch.fx.Node, ...] = ()  # a pair's second output (RoPE on k)


def _name(node: Any) -> str | None:
    return op_name(node) if isinstance(node, torch.fx.Node) else None


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _parameter(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _last_dim(dims: Any, node: torch.fx.Node) -> bool:
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    rank = node_rank(node)
    return dims == -1 or (rank is not None and dims == rank - 1)


# --------------------------------------------------------------------------------------------- RMSNorm

def _other(node: torch.fx.Node, known: torch.fx.Node) -> Any:
    """The operand of a binary ``node`` that is not ``known`` (None if ``known`` is not one of them)."""
    left, right = node.args[0], node.args[1] if len(node.args) > 1 else None
    return right if left is known else left if right is known else None


def _square_of(node: Any) -> torch.fx.Node | None:
    name = _name(node)
    if name in ("pow", "pow_") and len(node.args) > 1 and _number(node.args[1]) == 2.0:
        return node.args[0]
    if name == "square":
        return node.args[0]
    if name == "mul" and len(node.args) == 2 and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _weight_term(gm: torch.fx.GraphModule, node: Any, width: int | None) -> tuple[torch.fx.Node, float, bool] | None:
    """``(weight node, offset, weight_float)`` for ``w``, ``w.float()``, ``1 + w`` / ``w + 1`` (either cast)."""
    offset = 0.0
    if _name(node) == "add" and len(node.args) == 2:
        constant = next((_number(a) for a in node.args if _number(a) is not None), None)
        inner = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
        if constant is None or inner is None:
            return None
        offset, node = constant, inner
    weight_float = False
    if isinstance(node, torch.fx.Node) and float_cast(node) is torch.float32:
        weight_float, node = True, node.args[0]
    value = _parameter(gm, node)
    if value is None or value.dim() != 1 or (width is not None and value.shape[0] != width):
        return None
    return node, offset, weight_float


def match_rms_norm(gm: torch.fx.GraphModule, rsqrt: torch.fx.Node) -> Site | NoMatch | None:
    """``x̂ = [x.float()]; y = [1 +] w · (x̂ · rsqrt(mean(x̂², -1, keepdim) + eps))`` with optional casts before
    and after the weight, anchored at the ``rsqrt``; None if ``rsqrt`` is no rsqrt."""
    if _name(rsqrt) != "rsqrt":
        return None
    added = rsqrt.args[0]
    if _name(added) != "add" or len(added.args) != 2:
        return NoMatch(rsqrt, "rsqrt's input is not mean + eps")
    eps = next((_number(a) for a in added.args if _number(a) is not None), None)
    mean = next((a for a in added.args if isinstance(a, torch.fx.Node)), None)
    if eps is None or _name(mean) != "mean":
        return NoMatch(rsqrt, "rsqrt's input is not mean(x²) + a constant eps")
    keepdim = _arg(mean, 2, "keepdim", False)
    if not keepdim or not _last_dim(_arg(mean, 1, "dim"), mean.args[0]):
        return NoMatch(mean, "the mean is not over the last dimension with keepdim")
    source = _square_of(mean.args[0])
    if source is None:
        return NoMatch(mean.args[0], "the mean's input is not a square")
    users = [u for u in rsqrt.users]
    scaled = users[0] if len(users) == 1 and _name(users[0]) == "mul" else None
    original = source.args[0] if float_cast(source) is not False else None
    other = _other(scaled, rsqrt) if scaled is not None else None
    if scaled is None or (other is not source and (original is None or other is not original)):
        return NoMatch(rsqrt, "rsqrt is not used once, to scale the squared input")
    nodes = [source, mean.args[0], mean, added, rsqrt, scaled]
    upcast = float_cast(source) is torch.float32
    inner_users = {mean.args[0], scaled}
    x = source.args[0] if upcast and set(source.users) <= inner_users else source
    if x is source:
        nodes.remove(source)
        upcast = False
    output, mid, weight, offset, weight_float, out = scaled, None, None, 0.0, False, None
    while (user := _single_user(output)) is not None:
        cast = float_cast(user)
        if cast is not False and weight is None and mid is None:
            mid, output = cast, user
        elif cast is not False and weight is not None and out is None:
            out, output = cast, user
        elif _name(user) == "mul" and weight is None and len(user.args) == 2:
            term = _weight_term(gm, _other(user, output), _width(x))
            if term is None:
                break
            weight, offset, weight_float = term
            nodes.extend(n for n in (_other(user, output),) if n is not weight)
            output = user
        else:
            break
        nodes.append(output)
    return Site("rms_norm", output, (x, weight, eps), {"offset": offset, "upcast": upcast, "mid_dtype": mid,
                                                         "weight_float": weight_float, "out_dtype": out},
                nodes, module_path(rsqrt))


def _width(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    try:
        return int(shape[-1]) if shape is not None and len(shape) else None
    except (TypeError, ValueError):  # a symbolic width
        return None


def match_rms_norm_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Site | NoMatch | None:
    """A ``torch.nn.RMSNorm`` module call or ``F.rms_norm`` over the last dimension."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, torch.nn.RMSNorm) or node.kwargs or len(node.args) != 1:
            return None
        if len(module.normalized_shape) != 1:
            return NoMatch(node, "RMSNorm over more than the last dimension")
        weight = None
        if module.weight is not None:
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(f"{node.target}.weight")
        return Site("rms_norm", node, (node.args[0], weight, module.eps), {"upcast": False}, [node], str(node.target))
    if node.op == "call_function" and node.target is torch.nn.functional.rms_norm:
        shape = _arg(node, 1, "normalized_shape")
        eps = _arg(node, 3, "eps")
        if not isinstance(shape, (list, tuple)) or len(shape) != 1 or eps is None:
            return NoMatch(node, "rms_norm over more than the last dimension, or without an explicit eps")
        return Site("rms_norm", node, (node.args[0], _arg(node, 2, "weight"), float(eps)), {"upcast": False}, [node],
                    module_path(node))
    return None


# ------------------------------------------------------------------------------------------- LayerNorm

def match_layer_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Site | NoMatch | None:
    """``aten.layer_norm`` / ``F.layer_norm`` / an ``nn.LayerNorm`` module over the last dimension."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) is not torch.nn.LayerNorm or node.kwargs or len(node.args) != 1:
            return None
        if len(module.normalized_shape) != 1:
            return NoMatch(node, "LayerNorm over more than the last dimension")
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight") if module.weight is not None else None
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        return Site("layer_norm", node, (node.args[0], weight, bias, module.eps), {}, [node], str(node.target))
    if node.op == "call_function" and node.target in (aten.layer_norm.default, torch.nn.functional.layer_norm):
        shape = _arg(node, 1, "normalized_shape")
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return NoMatch(node, "layer_norm over more than the last dimension")
        eps = _arg(node, 4, "eps", 1e-5)
        return Site("layer_norm", node, (node.args[0], _arg(node, 2, "weight"), _arg(node, 3, "bias"), float(eps)),
                    {}, [node], module_path(node))
    return None


# ------------------------------------------------------------------------------------ gated activation

def _activation_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) is torch.nn.SiLU:
            return "silu"
        if type(module) is torch.nn.GELU:
            return "gelu_tanh" if module.approximate == "tanh" else "gelu"
        return None
    name = _name(node)
    if name == "silu":
        return "silu"
    if name == "gelu":
        approximate = _arg(node, 1, "approximate", "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu" if approximate == "none" else None
    return None


def match_glu(gm: torch.fx.GraphModule, act: torch.fx.Node) -> Site | NoMatch | None:
    """``act(a) * b`` (SwiGLU, GeGLU with tanh or erf GELU), anchored at the activation."""
    kind = _activation_kind(gm, act)
    if kind is None or not act.args or not isinstance(act.args[0], torch.fx.Node):
        return None
    user = _single_user(act)
    if user is None or _name(user) != "mul" or len(user.args) != 2 or user.args[0] is user.args[1]:
        return NoMatch(act, "the activation is not used once, by a product")
    other = _other(user, act)
    if not isinstance(other, torch.fx.Node):
        return NoMatch(user, "the activation is multiplied by a constant, not a gate")
    return Site("glu", user, (act.args[0], other, kind), {}, [act, user], module_path(user))


# ------------------------------------------------------------------------------------ rotary embedding

def _last_slice(node: Any) -> tuple[torch.fx.Node, Any, Any] | None:
    """``(x, start, stop)`` of a slice of the last dimension of ``x`` (``aten.slice`` or ``x[..., a:b]``)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.slice.Tensor:
        dim = _arg(node, 1, "dim", 0)
        if not _last_dim(dim, node.args[0]) or _arg(node, 4, "step", 1) != 1:
            return None
        return node.args[0], _arg(node, 2, "start", 0), _arg(node, 3, "end", _BIG)
    if node.target is operator.getitem and isinstance(node.args[1], tuple) and len(node.args[1]) == 2 \
            and node.args[1][0] is Ellipsis and isinstance(node.args[1][1], slice) and node.args[1][1].step is None:
        piece = node.args[1][1]
        return node.args[0], piece.start if piece.start is not None else 0, piece.stop if piece.stop is not None else _BIG
    return None


def _rotate_half_of(node: Any) -> tuple[torch.fx.Node, Any] | None:
    """``(x, split)`` when ``node`` is ``cat((-x[..., split:], x[..., :split]), -1)``."""
    if _name(node) != "cat" or not isinstance(node.args[0], (list, tuple)) or len(node.args[0]) != 2:
        return None
    if not _last_dim(_arg(node, 1, "dim", 0), node):
        return None
    negated, first = node.args[0]
    if _name(negated) != "neg":
        return None
    second = _last_slice(negated.args[0])
    first = _last_slice(first)
    if second is None or first is None or second[0] is not first[0]:
        return None
    (x, start_b, stop_b), (_, start_a, stop_a) = second, first
    ends = isinstance(stop_b, int) and stop_b >= _BIG // 4 if not isinstance(stop_b, torch.fx.Node) else False
    if start_a != 0 or start_b is not stop_a and start_b != stop_a or not ends:
        return None
    return x, stop_a


def match_rope(gm: torch.fx.GraphModule, cat: torch.fx.Node) -> Site | NoMatch | None:
    """``x·cos + rotate_half(x)·sin`` anchored at ``rotate_half``'s ``cat``."""
    rotated = _rotate_half_of(cat)
    if rotated is None:
        return None
    x, split = rotated
    product = _single_user(cat)
    if product is None or _name(product) != "mul":
        return NoMatch(cat, "rotate_half(x) is not used once, by a product with sin")
    sin = _other(product, cat)
    total = _single_user(product)
    if total is None or _name(total) != "add" or len(total.args) != 2:
        return NoMatch(product, "rotate_half(x)·sin is not added to x·cos")
    direct = _other(total, product)
    if _name(direct) != "mul" or _single_user(direct) is not total or x not in direct.args:
        return NoMatch(total, "the other term is not x·cos")
    cos = _other(direct, x)
    if not isinstance(cos, torch.fx.Node) or not isinstance(sin, torch.fx.Node):
        return NoMatch(total, "cos/sin are not graph values")
    nodes = [direct, product, total, cat, *cat.args[0], cat.args[0][0].args[0], cat.args[0][1]]
    return Site("rope", total, (x, cos, sin, split), {}, nodes, module_path(total))


def pair_rope(sites: list[Site]) -> list[tuple[Site, Site | None]]:
    """Group RoPE sites that share ``cos``, ``sin`` and the split within one module: two of them (query and
    key) become one pair call; others stay single."""
    groups: dict[tuple, list[Site]] = defaultdict(list)
    for site in sites:
        groups[(site.args[1], site.args[2], site.args[3], site.path)].append(site)
    pairs: list[tuple[Site, Site | None]] = []
    for group in groups.values():
        if len(group) == 2:
            pairs.append((group[0], group[1]))
        else:
            pairs.extend((site, None) for site in group)
    return pairs
