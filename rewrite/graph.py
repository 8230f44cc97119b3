"""Small graph utilities every pass uses: tidy-up after a rewrite, module paths, parameter lookup."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx

aten = torch.ops.aten


def finalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """After a rewrite: drop dead nodes, check the graph, regenerate the code. Returns ``gm``.

    Submodules are kept even when no node reads them any more: they may own a tied parameter under its
    original name (GPT-2's ``transformer.wte.weight`` is read through ``lm_head.weight``), and the state
    dict must keep that name for checkpoints, PEFT and Hugging Face. A pass that replaces a module
    removes the old one itself. Per-rewrite bookkeeping a pass left in ``gm.meta`` (``replaced_sites``, the
    nodes replaced by ``passes.linear_sites.install_site``) is dropped."""
    gm.meta.pop("replaced_sites", None)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def op_name(node: torch.fx.Node) -> str | None:
    """The op a call_function/call_method node computes, by name (``aten.softmax.int`` → ``softmax``,
    ``torch.softmax`` / ``F.softmax`` → ``softmax``, ``x.softmax()`` → ``softmax``); None for other nodes."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target.overloadpacket.__name__
        return getattr(target, "__name__", None)
    if node.op == "call_method":
        return str(node.target)
    return None


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost module ``node`` came from (``""`` for the root).

    Uses ``nn_module_stack`` (both capture paths record it); a ``call_module`` node is its target;
    a ``get_attr`` of a parameter is the parameter's owner.
    """
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path)
    return ""


def _clean_path(path: str) -> str:
    # symbolic_trace writes plain paths; export can write L['self'].transformer.h[0] style ones.
    path = path.replace("L['self'].", "").replace("L__self__.", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").split("["):
        out.append(part.strip(".").strip("'"))
    return ".".join(p for p in out if p)


_MISSING = object()


def get_attr_value(gm: torch.nn.Module, target: str, default: Any = _MISSING) -> Any:
    """Resolve a dotted attribute path on ``gm`` (a parameter, buffer, submodule or plain attribute): the
    value a ``get_attr`` node with this target reads. Returns ``default`` where the path does not resolve
    if one is given; raises AttributeError otherwise."""
    value: object = gm
    for part in target.split("."):
        if default is not _MISSING and not hasattr(value, part):
            return default
        value = getattr(value, part)
    return value


def parent_module(gm: torch.nn.Module, target: str, create: bool = False) -> tuple[torch.nn.Module, str]:
    """The module holding the last part of the dotted path ``target``, and that part's name. Missing parents
    are added as empty modules when ``create``; otherwise a missing one raises AttributeError."""
    parent: torch.nn.Module = gm
    *parents, leaf = target.split(".")
    for part in parents:
        if create and not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    return parent, leaf


def set_submodule(gm: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    """Install ``module`` at the dotted path ``target``, creating empty parent modules on the way."""
    parent, leaf = parent_module(gm, target, create=True)
    parent.add_module(leaf, module)


def block_index(path: str) -> int | None:
    """The index of the repeated block a module path lies in (``transformer.h.7.attn`` → 7), or None."""
    parts = path.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit() and parts[i - 1] in _BLOCK_CONTAINERS:
            return int(part)
    for part in parts:
        if part.isdigit():
            return int(part)
    return None


_BLOCK_CONTAINERS = {"h", "layers", "layer", "blocks", "block", "layer_list"}


# Ops whose result depends on their tensor input's shape only, never on its values.
_SHAPE_READERS = {aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
                  torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like, aten.ones_like.default,
                  aten.zeros_like.default, aten.empty_like.default, aten.full_like.default, aten.new_ones.default,
                  aten.new_zeros.default, aten.new_empty.default, aten.new_full.default}
_SHAPE_METHODS = {"size", "dim", "numel", "stride", "new_ones", "new_zeros", "new_empty", "new_full"}
_SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device")


def reads_only_shape(node: torch.fx.Node) -> bool:
    """True if ``node`` looks at its input's shape or other metadata (``size``, ``sym_size``, ``ones_like``,
    ``.shape``, ``.dtype``...) and never at its values."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_READERS:
        return True
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        return reads_only_shape(node.args[0])
    return False


def bounded_walk(start: torch.fx.Node, neighbours: Callable[[torch.fx.Node], Iterable[torch.fx.Node]], depth: int,
                 follow: Callable[[torch.fx.Node], bool] = lambda node: True) -> Iterator[torch.fx.Node]:
    """Breadth-first from ``start`` (not yielded) over ``neighbours(node)`` (e.g. ``lambda n: n.users``): yields
    each node first reached within ``depth`` steps, nearest first, once; only the nodes ``follow`` accepts are
    walked on from."""
    frontier, seen = [start], {start}
    for _ in range(depth):
        following = []
        for node in frontier:
            for reached in neighbours(node):
                if reached in seen:
                    continue
                seen.add(reached)
                yield reached
                if follow(reached):
                    following.append(reached)
        frontier = following


def depends_on_input_data(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value depends on the *values* of a graph input, not just on input shapes
    (e.g. a causal mask built from sizes does not; a padding mask built from ``attention_mask`` does)."""
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        if reads_only_shape(current):
            continue
        stack.extend(current.all_input_nodes)
    return False
