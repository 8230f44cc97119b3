"""Small graph utilities every pass uses: tidy-up after a rewrite, module paths, parameter lookup."""

from __future__ import annotations

import torch
import torch.fx


def finalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """After a rewrite: drop dead nodes, check the graph, regenerate the code. Returns ``gm``.

    Submodules are kept even when no node reads them any more: they may own a tied parameter under its
    original name (GPT-2's ``transformer.wte.weight`` is read through ``lm_head.weight``), and the state
    dict must keep that name for checkpoints, PEFT and Hugging Face. A pass that replaces a module
    removes the old one itself."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


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


def get_attr_value(gm: torch.fx.GraphModule, target: str) -> torch.Tensor | torch.nn.Module:
    """Resolve a dotted attribute path on ``gm`` (a parameter, buffer or submodule)."""
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value  # type: ignore[return-value]


def set_submodule(gm: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    """Install ``module`` at the dotted path ``target``, creating empty parent modules on the way."""
    parent: torch.nn.Module = gm
    *parents, leaf = target.split(".")
    for part in parents:
        if not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
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
