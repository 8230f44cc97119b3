"""Mechanics of ``remat``: cut a contiguous run of nodes out of a GraphModule into a sub-GraphModule and
call it under non-reentrant ``torch.utils.checkpoint`` from the parent graph.

The parent keeps every parameter, buffer and submodule (``get_attr`` nodes, module names unchanged);
a segment receives them as inputs, so its body owns no state: parameter names, ``.to(device)`` and
pickling behave as before the rewrite. ``call_module`` nodes inside a segment (symbolically traced
graphs) become ``_call_module(module, *args)`` with the module fetched by a ``get_attr`` in the parent.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from effcompile.export.registry import serializable

aten = torch.ops.aten

SEGMENT_PREFIX = "remat_segment_"
_RANDOM_TARGETS = {aten.dropout.default, aten.native_dropout.default, aten.bernoulli.default, aten.bernoulli.p,
                   aten.rand.default, aten.randn.default, aten.rand_like.default, aten.randn_like.default,
                   aten.randint.low, aten.randint.default, aten.randperm.default, aten.feature_dropout.default,
                   aten.alpha_dropout.default, torch.nn.functional.dropout, torch.dropout, torch.rand, torch.randn,
                   torch.rand_like, torch.randn_like, torch.bernoulli}
# (query, key, value, attn_mask, dropout_p, ...): random when dropout_p is not a literal 0.
_ATTENTION_WITH_DROPOUT = {aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention}


@serializable
class CheckpointedSegment(torch.nn.Module):
    """Runs ``body`` (a stateless GraphModule) under non-reentrant checkpointing: its intermediate
    activations are dropped after forward and recomputed in backward. ``preserve_rng_state`` is set when
    the body draws random numbers (dropout), so the recomputation sees the same random state."""

    def __init__(self, body: torch.fx.GraphModule, preserve_rng_state: bool = True) -> None:
        super().__init__()
        self.body = body
        self.preserve_rng_state = preserve_rng_state

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if not torch.is_grad_enabled():
            return self.body(*args)
        return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state)


@serializable(name="remat.call_module")
def _call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call a submodule handed to a segment body as an input (keeps the module owned by the parent)."""
    return module(*args, **kwargs)


def is_segment(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """True when ``node`` calls a CheckpointedSegment."""
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), CheckpointedSegment)


def segment_members(nodes: Sequence[torch.fx.Node], compute: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """The nodes of the range ``nodes`` (graph order) that a segment over it contains: every compute
    node and every node that depends on one already in the segment. The rest (parameters, shape and
    mask arithmetic on inputs) stay in the parent, ahead of the segment call."""
    members: list[torch.fx.Node] = []
    inside: set[torch.fx.Node] = set()
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node in compute or any(source in inside for source in node.all_input_nodes):
            members.append(node)
            inside.add(node)
    return members


def is_random(node: torch.fx.Node) -> bool:
    """True when ``node`` draws from the random generator (dropout with p > 0 or unknown p, rand*)."""
    target = node.target
    if node.op == "call_module":
        return True  # a module may hold dropout: keep the random state to be safe
    if target in (aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default,
                  torch.nn.functional.dropout, torch.dropout):
        probability = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
        return not (isinstance(probability, (int, float)) and probability == 0) and training is not False
    if target in _ATTENTION_WITH_DROPOUT:  # attention kernels draw their dropout mask internally
        probability = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return not (isinstance(probability, (int, float)) and probability == 0)
    return target in _RANDOM_TARGETS or (node.op == "call_method" and node.target in ("bernoulli_", "uniform_",
                                                                                       "normal_", "random_"))


def extract_segment(gm: torch.fx.GraphModule, members: Sequence[torch.fx.Node], index: int) -> torch.fx.Node:
    """Replace ``members`` (graph order, a segment as ``segment_members`` returns it) by one call of a
    new ``CheckpointedSegment`` registered as ``remat_segment_<index>``. Returns the call node."""
    random = any(is_random(n) for n in members)
    call = extract_subgraph(gm, members, f"{SEGMENT_PREFIX}{index}", f"RematSegment{index}",
                            lambda body, inputs: CheckpointedSegment(body, preserve_rng_state=random))
    call.meta["remat_segment"] = index
    return call


def extract_subgraph(gm: torch.fx.GraphModule, members: Sequence[torch.fx.Node], name: str, class_name: str,
                     wrap: Callable[[torch.fx.GraphModule, list[torch.fx.Node]], torch.nn.Module]) -> torch.fx.Node:
    """Replace ``members`` (graph order, contiguous up to nodes they do not use) by one ``call_module`` of
    ``wrap(body, inputs)`` registered as ``name``: ``body`` is a stateless GraphModule over ``members`` whose
    placeholders are ``inputs`` (the parent nodes the members read, in order of first use) followed by one
    per submodule the members call. Outputs the parent still uses are read back through ``getitem`` nodes
    (``meta["remat_source"]`` names the node each replaces). Returns the call node."""
    member_set = set(members)
    inputs: list[torch.fx.Node] = []
    for node in members:
        for source in node.all_input_nodes:
            if source not in member_set and source not in inputs:
                inputs.append(source)
    outputs = [n for n in members if any(user not in member_set for user in n.users)]

    body_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    module_inputs: dict[torch.fx.Node, str] = {}
    for source in inputs:
        env[source] = body_graph.placeholder(source.name)
        env[source].meta = dict(source.meta)
    for node in members:
        if node.op == "call_module":
            module_placeholder = body_graph.placeholder(f"module_{node.name}")
            module_inputs[node] = str(node.target)
            args = tuple(torch.fx.map_arg(node.args, lambda n: env[n]))
            kwargs = dict(torch.fx.map_arg(node.kwargs, lambda n: env[n]))
            env[node] = body_graph.call_function(_call_module, (module_placeholder, *args), kwargs)
            env[node].meta = dict(node.meta)
        else:
            env[node] = body_graph.node_copy(node, lambda n: env[n])
    # Placeholders must precede every other node: move the module placeholders up front.
    first_compute = next((n for n in body_graph.nodes if n.op != "placeholder"), None)
    if first_compute is not None:
        for placeholder in [n for n in body_graph.nodes if n.op == "placeholder"]:
            first_compute.prepend(placeholder)
    body_graph.output(tuple(env[n] for n in outputs))
    body = torch.fx.GraphModule(torch.nn.Module(), body_graph, class_name)
    gm.add_module(name, wrap(body, inputs))

    following = members[-1].next  # everything new goes, in order, between the last member and this
    replacements = []
    with gm.graph.inserting_before(following):
        module_getters = [gm.graph.get_attr(target) for target in module_inputs.values()]
        call = gm.graph.call_module(name, tuple(inputs) + tuple(module_getters))
        if members[0].meta.get("nn_module_stack"):
            call.meta["nn_module_stack"] = dict(members[0].meta["nn_module_stack"])
        for position, node in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, position))
            item.meta = dict(node.meta)
            item.meta["remat_source"] = node.meta.get("remat_source", node.name)
            replacements.append((node, item))
    for node, item in replacements:
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in member_set)
    for node in reversed(members):
        gm.graph.erase_node(node)
    return call
