"""Shared by ``lora`` and ``lowrank``: choose linear sites by target patterns, read their weight as an
``[out, in]`` matrix, and swap a site for a ``call_module`` of a new module installed at the site's path.

1. ``select_sites`` matches each site of ``effcompile.patterns.find_linears`` against the targets
   (PEFT's rule for plain names: the module path equals the name or ends with ``.name``; globs
   with ``* ? [``; regular expressions, matched in full, when the pattern holds ``^ $ ( ) | + \\ { }``
   or ``.*``) and says, per linear, why it was or was not taken.
2. ``install_site`` puts the new module at the site's module path, carrying over every parameter,
   buffer and child of the module it replaces (other graph nodes may still read them), and
   replaces the matched node by ``call_module(path, (input,))`` with the node's metadata.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from effcompile.errors import OptionError
from effcompile.graph import get_attr_value, set_submodule
from effcompile.patterns import LinearSite, find_linears

_REGEX_MARKERS = ("^", "$", "(", ")", "|", "+", "\\", "{", "}", ".*", ".+")
_GLOB_MARKERS = ("*", "?", "[")


def pattern_kind(pattern: str) -> str:
    """``"regex"``, ``"glob"`` or ``"name"`` (a plain module name or dotted path suffix)."""
    if any(marker in pattern for marker in _REGEX_MARKERS):
        return "regex"
    if any(marker in pattern for marker in _GLOB_MARKERS):
        return "glob"
    return "name"


def check_patterns(pass_name: str, patterns: Sequence[str]) -> None:
    """Raise OptionError for an empty target list or a regular expression that does not compile."""
    if not patterns:
        raise OptionError(f"{pass_name}: targets is empty; name at least one module, e.g. "
                          f"--set {pass_name}.targets=q_proj,v_proj")
    for pattern in patterns:
        if pattern_kind(pattern) == "regex":
            try:
                re.compile(pattern)
            except re.error as error:
                raise OptionError(f"{pass_name}: targets pattern {pattern!r} is not a valid regular "
                                  f"expression ({error}); fix it or use a glob such as '*attn*'") from None


def matches(path: str, pattern: str) -> bool:
    """Whether the module ``path`` is selected by ``pattern`` (see the module docstring)."""
    name = path.rsplit(".", 1)[-1]
    kind = pattern_kind(pattern)
    if kind == "regex":
        return re.fullmatch(pattern, path) is not None or re.fullmatch(pattern, name) is not None
    if kind == "glob":
        return fnmatch.fnmatchcase(path, pattern) or fnmatchcase_name(name, pattern)
    return path == pattern or path.endswith("." + pattern)


def fnmatchcase_name(name: str, pattern: str) -> bool:
    """Glob match of a pattern without dots against the last path component only."""
    return "." not in pattern and fnmatch.fnmatchcase(name, pattern)


@dataclass
class Selection:
    """The sites a pass will rewrite and, for every linear it looked at, why (``explain``)."""

    sites: list[LinearSite]
    explain: dict[str, str]
    all_paths: list[str]


def select_sites(gm: torch.fx.GraphModule, targets: Iterable[str], exclude: Iterable[str] = ()) -> Selection:
    """The linear sites of ``gm`` whose path matches one of ``targets`` and none of ``exclude``."""
    targets, exclude = list(targets), list(exclude)
    sites, explain, paths = [], {}, []
    for site in find_linears(gm):
        paths.append(site.path)
        hit = next((p for p in targets if matches(site.path, p)), None)
        blocked = next((p for p in exclude if matches(site.path, p)), None)
        if hit is None:
            explain.setdefault(site.path, "no target pattern matches")
        elif blocked is not None:
            explain.setdefault(site.path, f"excluded by {blocked!r}")
        else:
            explain[site.path] = f"matched {hit!r}"
            sites.append(site)
    return Selection(sites, explain, paths)


def weight_out_in(gm: torch.fx.GraphModule, site: LinearSite) -> torch.Tensor:
    """The site's weight as an ``[out, in]`` matrix (a transposed view for Conv1D/addmm/mm layouts)."""
    weight = get_attr_value(gm, site.weight_target)
    assert isinstance(weight, torch.Tensor)
    return weight if site.weight_layout == "out_in" else weight.t()


def parameter_names(gm: torch.nn.Module, tensor: torch.Tensor) -> list[str]:
    """Every name under which ``tensor`` is registered in ``gm`` (tied weights have several)."""
    return [name for name, value in list(gm.named_parameters(remove_duplicate=False))
            + list(gm.named_buffers(remove_duplicate=False)) if value is tensor]


def weight_used_elsewhere(gm: torch.fx.GraphModule, site: LinearSite) -> str | None:
    """A description of another use of the site's weight (a tied name, another node), or None."""
    weight = get_attr_value(gm, site.weight_target)
    others = [n for n in parameter_names(gm, weight) if n != site.weight_target]
    if others:
        return f"weight is tied to {others[0]}"
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == site.weight_target:
            users = [u for u in node.users if u is not site.node]
            if users:
                return f"weight is also read by node {users[0].name}"
    for node in gm.graph.nodes:
        if node.op == "call_module" and node is not site.node and node.target == site.path:
            return f"module is also called by node {node.name}"
    return None


def install_site(gm: torch.fx.GraphModule, site: LinearSite, module: torch.nn.Module,
                 drop: Iterable[str] = ()) -> torch.fx.Node:
    """Install ``module`` at ``site.path`` and call it instead of ``site.node``; return the new node.

    Parameters, buffers and children of the module previously at that path are carried over to
    ``module`` unless ``module`` already has an attribute of that name or it is listed in ``drop``.
    The caller runs ``effcompile.graph.finalize`` once after all sites.
    """
    dropped = set(drop)
    try:
        old = gm.get_submodule(site.path)
    except AttributeError:
        old = None
    if old is not None and old is not module:
        for name, value in list(old._parameters.items()) + list(old._buffers.items()):
            if name in dropped or value is None or hasattr(module, name):
                continue
            if isinstance(value, torch.nn.Parameter):
                module.register_parameter(name, value)
            else:
                module.register_buffer(name, value)
        for name, child in old._modules.items():
            if name not in dropped and child is not None and not hasattr(module, name):
                module.add_module(name, child)
    set_submodule(gm, site.path, module)
    graph = gm.graph
    # Sites are found before any is replaced: one whose input was an earlier site (Kimi's forget gate: a
    # linear into a linear) still names that site's erased node; read the node that replaced it.
    replaced: dict[torch.fx.Node, torch.fx.Node] = gm.meta.setdefault("replaced_sites", {})
    source = site.input
    while isinstance(source, torch.fx.Node) and source in replaced:
        source = replaced[source]
    with graph.inserting_before(site.node):
        node = graph.call_module(site.path, (source,))
    node.meta.update({k: v for k, v in site.node.meta.items()})
    site.node.replace_all_uses_with(node)
    graph.erase_node(site.node)
    replaced[site.node] = node
    return node


def erase_dead_attrs(gm: torch.fx.GraphModule) -> None:
    """Drop ``get_attr`` nodes nothing reads (left behind by replaced sites)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
