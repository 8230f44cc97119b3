"""Exact canonicalisations of captured graphs: give attention back the arguments eager mode passes.

Captured Hugging Face graphs build the causal mask as a boolean tensor (tracing turns off the "mask is
plain causal, pass None" shortcut that eager mode takes) and repeat grouped key/value heads with
``repeat_kv`` copies. SDPA with an explicit mask cannot use the flash kernel — the fastest one in
bfloat16/float16 — and computes the masked-out half of a causal attention too. ``causal_sdpa`` undoes
both, exactly:

1. An SDPA mask qualifies when it is computed from shapes only (no graph input reaches it except through
   ``sym_size`` / ``size`` / ``.shape``, so it is the same for every batch of this length) and on the
   example inputs it is boolean ``[..., L, L]`` and equals ``tril(ones(L, L))`` everywhere, which is what
   ``is_causal=True`` means (top-left aligned). Only the mask's own subgraph is evaluated, not the model.
2. The call then gets ``is_causal=True`` and no mask; when its key and value are ``repeat_kv``'s
   ``reshape(expand(unsqueeze(x, 2)))`` it also takes the un-repeated ``x`` with ``enable_gqa=True``.

3. ``uncast_outputs``: a graph output that is a dtype conversion which did nothing at capture
   (``logits.float()`` on float32 logits: the model returned the same tensor it upcast for its loss, as
   every Hugging Face LM does) returns the unconverted tensor, as eager mode does. Otherwise, run in low
   precision (autocast, ``amp``), the graph would return — and ``torch.compile`` would keep — the float32
   upcast of the logits instead of the model's low-precision ones.

4. ``loss_boundary``: when the graph returns a tensor that it also feeds to later computation (the logits,
   which the loss head reads), a ``torch._dynamo.graph_break()`` call follows it — a no-op when the graph
   runs eagerly or is exported. Under ``torch.compile`` the graph then compiles as two graphs, as a Hugging
   Face model does (its loss function breaks the graph there): the logits are the first graph's output
   *and* the second's input, so their gradient arrives from the loss. In one graph, a training loop that
   drops the logits output leaves AOTAutograd a missing tangent, which it fills with a materialised
   all-zero logits-sized tensor at the start of backward (0.77 GiB at batch 8 × 1024 × 50304 in bf16).

They run at capture on graphs from ``torch.export``, whose sequence length is static, so "equals the causal
mask on the example" holds for every input the graph accepts. A symbolically traced graph is
shape-generic (a sliding-window mask is lower-triangular only up to its window), so capture leaves those
alone; the ``amp`` pass, which evaluates the whole graph anyway, applies step 1 to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch._dynamo
import torch.fx

from .graph import depends_on_input_data
from .patterns import DTYPE_CONVERSIONS, find_attention

aten = torch.ops.aten
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def causal_mask_candidates(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(SDPA node, mask node) pairs whose mask depends on the inputs' shapes only."""
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


def set_causal(sdpa: torch.fx.Node, gqa: bool = False) -> None:
    """Drop ``sdpa``'s mask argument and set ``is_causal=True`` (other arguments kept). With ``gqa``, a key
    and value that are both ``repeat_kv`` copies are replaced by their sources and ``enable_gqa=True``."""
    query, key, value = sdpa.args[:3]
    rest = dict(zip(_SDPA_ARGS, sdpa.args[3:]))
    rest.update(sdpa.kwargs)
    rest.pop("attn_mask", None)
    rest["is_causal"] = True
    if gqa:
        key_source, value_source = repeat_kv_source(key), repeat_kv_source(value)
        if key_source is not None and value_source is not None:
            key, value = key_source, value_source
            rest["enable_gqa"] = True
    sdpa.args, sdpa.kwargs = (query, key, value), rest


def repeat_kv_source(node: Any) -> torch.fx.Node | None:
    """The un-repeated key/value behind Hugging Face's ``repeat_kv`` in aten form
    (``reshape(expand(unsqueeze(x, 2), [B, Hkv, n, S, D]), [B, Hkv·n, S, D])``), or None."""
    if not (isinstance(node, torch.fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.target is aten.expand.default and len(expand.args[1]) == 5):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, torch.fx.Node) and unsqueeze.target is aten.unsqueeze.default
            and unsqueeze.args[1] == 2):
        return None
    source = unsqueeze.args[0]
    return source if isinstance(source, torch.fx.Node) else None


def evaluate_nodes(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node], inputs: Sequence[Any]
                   ) -> dict[torch.fx.Node, Any]:
    """The values of ``nodes`` on ``inputs`` (the graph's placeholders in order), computing only their
    ancestors (no gradients). Cheap for shape-only subgraphs such as causal masks."""
    wanted = list(nodes)
    needed: set[torch.fx.Node] = set()
    stack = list(wanted)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    interpreter = torch.fx.Interpreter(gm)
    placeholders = iter(inputs)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = next(placeholders, None)
                if node in needed:
                    interpreter.env[node] = value
            elif node in needed:
                interpreter.env[node] = interpreter.run_node(node)
    return {node: interpreter.env.get(node) for node in wanted}


def uncast_outputs(gm: torch.fx.GraphModule) -> int:
    """Return, in place of each graph output that is a dtype conversion which was a no-op at capture (its
    input already had that dtype, per export's ``meta["val"]``), the conversion's input. Exact at the capture
    dtype. Returns how many outputs changed."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    changed = 0

    def replace(node: Any) -> Any:
        nonlocal changed
        if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in DTYPE_CONVERSIONS):
            return node
        source = node.args[0]
        value, before = node.meta.get("val"), getattr(source, "meta", {}).get("val")
        if not (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor)):
            return node
        if value.dtype != before.dtype or value.device != before.device or value.shape != before.shape:
            return node
        changed += 1
        return source

    output.args = (torch.fx.node.map_arg(output.args[0], replace),)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


torch.fx.node.has_side_effect(torch._dynamo.graph_break)  # a marker that dead-code elimination must keep


def is_loss_boundary(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the ``torch._dynamo.graph_break()`` marker ``loss_boundary`` inserts."""
    return node.op == "call_function" and node.target is torch._dynamo.graph_break


def loss_boundary(gm: torch.fx.GraphModule) -> int:
    """Insert ``torch._dynamo.graph_break()`` right after the last floating-point graph output that other
    nodes also read (the logits a loss head consumes), so ``torch.compile`` splits the graph there. Exact (a
    no-op outside dynamo). Returns 1 when inserted, 0 when no output qualifies or a marker exists."""
    nodes = list(gm.graph.nodes)
    if any(is_loss_boundary(n) for n in nodes):
        return 0
    output = next(n for n in reversed(nodes) if n.op == "output")
    position = {n: i for i, n in enumerate(nodes)}
    shared = []
    for leaf in _leaves(output.args[0]):
        value = leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1 and \
                any(user is not output for user in leaf.users):
            shared.append(leaf)
    if not shared:
        return 0
    last = max(shared, key=position.__getitem__)
    with gm.graph.inserting_after(last):
        gm.graph.call_function(torch._dynamo.graph_break)
    gm.recompile()
    return 1


def _leaves(value: Any) -> list[Any]:
    leaves: list[Any] = []
    torch.fx.node.map_arg(value, leaves.append)
    return leaves


def causal_sdpa(program: Any, gqa: bool = True) -> int:
    """Give every SDPA call of ``program`` (an ``effcompile.program.Program``, rewritten in place) whose mask
    is provably the causal one ``is_causal=True`` instead, and (``gqa``) ``enable_gqa`` on the un-repeated
    key/value. Exact. Returns how many SDPA calls changed."""
    pairs = causal_mask_candidates(program.gm)
    if not pairs:
        return 0
    values = evaluate_nodes(program.gm, {mask for _, mask in pairs}, program.flat_inputs())
    changed = 0
    for sdpa, mask in pairs:
        if is_causal_value(values.get(mask)):
            set_causal(sdpa, gqa=gqa)
            changed += 1
    if changed:
        program.gm.graph.eliminate_dead_code()  # the mask arithmetic; modules stay registered (names kept)
        program.gm.recompile()
    return changed
