"""The graph side of ``sas``: read each matched attention's arguments, observe it on the example inputs, tell
self- from cross-attention, and put a ``SparseAttention`` call in its place.

1. ``plan_site``: scale, mask (additive, boolean, ``masked_fill`` with a large negative value, or an additive
   bias plus a fill mask, as DeBERTa's relative-position scores), dropout, causality, GQA, heads folded
   into the batch (``bmm`` form), ``nn.MultiheadAttention`` calls — or why the attention cannot be rewritten.
2. ``observe``: one dense run (an ``Interpreter``, no gradients) records each attention's head counts and
   lengths and what its mask is (causal? built from the inputs?).
3. ``projection_source``: where a query or key comes from (the input of the projection that made it).
   Query and key from different sources, or different lengths, is cross-attention.
4. ``install``: the ``SparseAttention`` module at ``<attention path>.sas`` replaces the chain; ``view`` nodes
   that read its output (through transposes) become ``reshape`` (the kernels' outputs need not have the
   replaced op's strides).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from effcompile.data_branches import is_data_branch_check
from effcompile.export.registry import serializable
from effcompile.graph import get_attr_value, reads_only_shape, set_submodule
from effcompile.patterns import ASSERTION_OPS, TRANSPOSE_OPS, VIEW_OPS, AttentionSite, LinearSite, is_softmax

aten = torch.ops.aten
_DTYPE_OPS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.to.dtype_layout}
_DTYPE_METHODS = {"to", "type_as", "float", "half", "bfloat16", "clone"}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"}
_DIV = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div"}
_ADD = {operator.add, torch.add, aten.add.Tensor, "add"}
_MASKED_FILL = {aten.masked_fill.Scalar, torch.masked_fill, "masked_fill"}
_DROPOUT = {F.dropout, aten.dropout.default}
_VIEWS = VIEW_OPS | {"view", "reshape"}
# Ops through which a view of the attention output stays a view of it (their output's strides follow).
# Reshapes are among them: reshape returns a view when the strides allow it and clone/alias keep them
# (preserve_format), so a view further down still depends on the replaced op's layout (afmoe: sdpa → reshape →
# transpose → view).
_LAYOUT = TRANSPOSE_OPS | _VIEWS | {
    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, aten.select.int,
    torch.unsqueeze, torch.squeeze, operator.getitem, "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "unflatten", "flatten", "t", aten.clone.default, torch.clone, "clone", aten.alias.default}
# masked_fill values at or below this count as "masked out" (HF uses finfo.min, others -1e4 or -inf).
_MASKED_VALUE = -1e4


@dataclass
class SitePlan:
    """How one attention maps onto ``SparseAttention``'s arguments."""

    site: AttentionSite
    key_transposed: bool = False
    bias: Any = None  # additive mask node (applied before a fill mask, times ``bias_scale``)
    bias_scale: float = 1.0
    keep: Any = None  # boolean "attended" mask node
    keep_kind: str | None = None  # "bool" (True = attend), "fill" (masked_fill: True = masked out), "auto" (SDPA)
    scale: float | None = None
    scale_ops: list[tuple[str, Any]] = field(default_factory=list)  # runtime (op, node) scale factors
    dropout_p: float = 0.0
    causal: bool = False
    chain: list[torch.fx.Node] = field(default_factory=list)

    @property
    def mask_nodes(self) -> list[torch.fx.Node]:
        """The mask nodes the sparse call reads."""
        return [n for n in (self.bias, self.keep) if isinstance(n, torch.fx.Node)]


def _is_call(node: Any, targets: set) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    return node.target in targets


def _numel(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.numel()
    return None if value is None or not isinstance(value, (int, float)) else 1


def plan_site(site: AttentionSite) -> SitePlan | str:
    """The rewrite plan of one matched attention, or why it cannot be rewritten."""
    if site.kind == "module":
        return SitePlan(site, dropout_p=site.dropout_p, chain=[site.node])
    if site.kind == "sdpa":
        if site.scale is not None and not isinstance(site.scale, (int, float)):
            return "the scale is computed at run time"
        plan = SitePlan(site, scale=None if site.scale is None else float(site.scale), dropout_p=site.dropout_p,
                        causal=site.is_causal, chain=[site.node])
        if isinstance(site.attn_mask, torch.fx.Node):
            plan.bias, plan.keep_kind = site.attn_mask, "auto"  # bool or additive: decided from the tensor
        elif site.attn_mask is not None:
            return "attn_mask is not a tensor"
        return plan
    return _plan_explicit(site)


def _plan_explicit(site: AttentionSite) -> SitePlan | str:
    plan = SitePlan(site, key_transposed=True, scale=1.0, chain=list(site.nodes))
    nodes = site.nodes
    softmax_at = next(i for i, n in enumerate(nodes) if is_softmax(n))
    previous = nodes[0]
    for node in nodes[1:softmax_at]:  # score matmul → softmax
        others = [a for a in node.args if a is not previous]
        other = others[0] if others else None
        if _is_call(node, _MUL) or _is_call(node, _DIV):
            reason = _plan_scale(plan, node, other)
            if reason:
                return reason
        elif _is_call(node, _ADD):
            if plan.bias is not None or plan.keep is not None:
                return f"a second mask at {node.name}"
            plan.bias = other
        elif _is_call(node, _MASKED_FILL):
            value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            if plan.keep is not None:
                return f"a second masked_fill at {node.name}"
            if not isinstance(value, (int, float)) or value > _MASKED_VALUE:
                return f"masked_fill at {node.name} with value {value!r} (only large negative values mask)"
            plan.keep, plan.keep_kind = node.args[1], "fill"
        elif not (_is_call(node, _DTYPE_OPS) or _is_call(node, _DTYPE_METHODS) or _is_call(node, _VIEWS)):
            return f"unsupported op {node.name} ({node.target}) between the score matmul and softmax"
        previous = node
    dim = nodes[softmax_at].args[1] if len(nodes[softmax_at].args) > 1 else nodes[softmax_at].kwargs.get("dim", -1)
    value = nodes[softmax_at].meta.get("val")
    if dim != -1 and not (isinstance(value, torch.Tensor) and dim == value.dim() - 1):
        return f"softmax over dim {dim}, not the last"
    for node in nodes[softmax_at + 1:-1]:  # softmax → value matmul
        if _is_call(node, _DROPOUT):
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", node.kwargs.get("train", True))
            if not isinstance(p, (int, float)) or not isinstance(train, bool):
                return f"the dropout probability at {node.name} is computed at run time"
            plan.dropout_p = float(p) if train else 0.0
        elif not (_is_call(node, _DTYPE_OPS) or _is_call(node, _DTYPE_METHODS) or _is_call(node, _VIEWS)):
            return f"unsupported op {node.name} ({node.target}) between softmax and the value matmul"
    return plan


def _plan_scale(plan: SitePlan, node: torch.fx.Node, other: Any) -> str | None:
    divide = _is_call(node, _DIV)
    if isinstance(other, (int, float)):
        factor = 1.0 / other if divide else float(other)
        plan.scale = (plan.scale or 1.0) * factor
        plan.bias_scale *= factor if plan.bias is not None else 1.0
        return None
    if isinstance(other, torch.fx.Node) and _numel(other) in (None, 1):
        if plan.bias is not None:
            return f"a run-time scale at {node.name} after an additive mask"
        plan.scale_ops.append(("div" if divide else "mul", other))
        return None
    return f"scores multiplied by a tensor at {node.name}"


@dataclass
class Observation:
    """What one attention looked like on the example inputs."""

    heads: int
    kv_heads: int
    query_len: int
    key_len: int
    mask: dict[str, Any] | None = None  # kind, within_causal, exactly_causal


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value
        return value


def observe(gm: torch.fx.GraphModule, inputs: list[Any], plans: list[SitePlan]) -> list[Observation]:
    """Run ``gm`` once (no gradients) and describe each planned attention. Raises RuntimeError when an
    attention did not run."""
    wanted = {n for p in plans for n in (p.site.query, p.site.key, p.bias, p.keep) if isinstance(n, torch.fx.Node)}
    recorder = _Recorder(gm, wanted)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        recorder.run(*inputs)
    observations = []
    for plan in plans:
        site = plan.site
        query, key = recorder.values.get(site.query), recorder.values.get(site.key)
        if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
            raise RuntimeError(f"attention {site.path} did not run on the example inputs")
        if site.kind == "module":
            module = gm.get_submodule(str(site.module_target))
            seq_dim = 0 if query.dim() == 2 or not module.batch_first else 1
            observations.append(Observation(module.num_heads, module.num_heads, query.shape[seq_dim], key.shape[seq_dim]))
            continue
        key_len = key.shape[-1] if plan.key_transposed else key.shape[-2]
        heads = site.heads_in_batch or (query.shape[1] if query.dim() == 4 else 1)
        kv_heads = site.heads_in_batch or (key.shape[1] if key.dim() == 4 else 1)
        observation = Observation(heads, kv_heads, query.shape[-2], key_len)
        bias, keep = recorder.values.get(plan.bias), recorder.values.get(plan.keep)
        if isinstance(bias, torch.Tensor) or isinstance(keep, torch.Tensor):
            observation.mask = _describe_mask(bias, keep, plan.keep_kind, query.shape[-2], key_len)
        observations.append(observation)
    return observations


def _describe_mask(bias: Any, keep: Any, keep_kind: str | None, query_len: int, key_len: int) -> dict[str, Any]:
    """The mask's kind, whether it admits nothing above the diagonal, and whether it is exactly causal."""
    allowed = torch.ones(query_len, key_len, dtype=torch.bool)
    values_zero, kind = True, "bool"
    if isinstance(bias, torch.Tensor):
        if bias.dtype == torch.bool:
            allowed = allowed.to(bias.device) & bias
        else:
            kind = "additive"
            admitted = bias > torch.finfo(bias.dtype).min / 2
            values_zero = bool((bias.masked_fill(~admitted, 0) == 0).all())
            allowed = allowed.to(bias.device) & admitted
    if isinstance(keep, torch.Tensor):
        allowed = allowed.to(keep.device) & (~keep if keep_kind == "fill" else keep)
    tril = torch.ones(query_len, key_len, dtype=torch.bool, device=allowed.device).tril()
    subset = not bool((allowed & ~tril).any())
    exact = subset and values_zero and bool((allowed == tril).all())
    if isinstance(bias, torch.Tensor) and isinstance(keep, torch.Tensor):
        kind = "additive bias + bool"
    return {"kind": kind, "within_causal": subset, "exactly_causal": exact}


def projection_source(node: Any, linears: dict[torch.fx.Node, LinearSite], depth: int = 40) -> Any:
    """The input of the projection (linear-like op) that ``node`` (a query or key) derives from, following
    each op's first tensor argument (views, splits, RoPE, casts); the node where the walk stopped if none."""
    current = node
    for _ in range(depth):
        if not isinstance(current, torch.fx.Node):
            return current
        if current in linears:
            return _unwrap(linears[current].input)
        if current.op in ("placeholder", "get_attr"):
            return current
        tensors = [a for a in _flat(current.args) if isinstance(a, torch.fx.Node)]
        # A stored tensor (a norm's weight in ``weight * normed``, QK-norm) is not where the activations come from.
        first = next((a for a in tensors if a.op != "get_attr"), tensors[0] if tensors else None)
        if first is None:
            return current
        current = first
    return current


def _unwrap(node: Any) -> Any:
    """``node`` without the casts, copies and views around it (two projections of one tensor may each
    read their own cast of it)."""
    while isinstance(node, torch.fx.Node) and node.args and (
            _is_call(node, _DTYPE_OPS) or _is_call(node, _DTYPE_METHODS) or _is_call(node, _VIEWS)
            or _is_call(node, {aten.contiguous.default, "contiguous"})):
        node = node.args[0]
    return node


def _flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for arg in args:
        out.extend(_flat(arg) if isinstance(arg, (list, tuple)) else [arg])
    return out


def cross_reason(plan: SitePlan, observation: Observation, linears: dict[torch.fx.Node, LinearSite]) -> str | None:
    """Why this attention is cross-attention (query and key from different sources or lengths), else None."""
    if observation.query_len != observation.key_len:
        return f"query length {observation.query_len} ≠ key length {observation.key_len}"
    query_source = projection_source(plan.site.query, linears)
    key_source = projection_source(plan.site.key, linears)
    if query_source is not key_source:
        name = getattr(key_source, "name", key_source)
        return f"keys come from {name}, queries from {getattr(query_source, 'name', query_source)}"
    return None


def install(gm: torch.fx.GraphModule, plan: SitePlan, module: torch.nn.Module, exported: bool) -> tuple[str, torch.fx.Node]:
    """Put ``module`` at ``<path>.sas`` and call it in place of the planned chain. Returns (target, call node)."""
    site = plan.site
    graph = gm.graph
    target = _unique_target(gm, site.path)
    set_submodule(gm, target, module)
    with graph.inserting_before(site.node):
        if site.kind == "module":
            node = _install_module_call(gm, site, target)
        else:
            node = _install_call(graph, plan, target, exported)
    node.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    if site.kind != "module":
        site.node.replace_all_uses_with(node)
    chain = set(plan.chain) | {u for n in plan.chain for u in n.users if reads_only_shape(u)}
    for candidate in list(graph.nodes):
        if candidate.op == "call_function" and candidate.target in ASSERTION_OPS and \
                any(arg in chain for arg in candidate.all_input_nodes) and not candidate.users \
                and not is_data_branch_check(candidate):
            graph.erase_node(candidate)
    # Erase the replaced chain explicitly: dead-code elimination keeps random ops (SDPA, dropout).
    for candidate in reversed(list(graph.nodes)):
        if candidate in chain and not candidate.users:
            graph.erase_node(candidate)
    return target, node


def _install_call(graph: torch.fx.Graph, plan: SitePlan, target: str, exported: bool) -> torch.fx.Node:
    site = plan.site
    key = site.key
    if plan.key_transposed:
        key = graph.call_function(aten.transpose.int if exported else torch.transpose, (key, -2, -1))
    mask: Any = plan.bias
    if mask is not None and plan.bias_scale != 1.0:
        mask = graph.call_function(operator.mul, (mask, plan.bias_scale))
    keep = plan.keep
    if plan.keep_kind == "fill":  # masked_fill's mask says "masked out"
        keep = graph.call_function(aten.logical_not.default if exported else torch.logical_not, (keep,))
    if mask is not None and keep is not None:
        mask = graph.call_function(masked_bias, (mask, keep, site.heads_in_batch))
    elif keep is not None:
        mask = keep
    scale: Any = None
    if plan.scale_ops:
        scale = plan.scale
        for op, operand in plan.scale_ops:
            scale = graph.call_function(operator.truediv if op == "div" else operator.mul, (scale, operand))
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs["attn_mask"] = mask
    if scale is not None:
        kwargs["scale"] = scale
    return graph.call_module(target, (site.query, key, site.value), kwargs)


@serializable(name="sas.masked_bias")  # a graph function: saved folders name it
def masked_bias(bias: torch.Tensor, keep: torch.Tensor, heads_in_batch: int = 0) -> torch.Tensor:
    """An additive bias (``[B·H, Sq, Sk]`` when ``heads_in_batch`` > 0, else broadcastable to the scores) with
    ``-inf`` where the boolean ``keep`` mask (True = attend) masks: one additive mask for both."""
    if heads_in_batch and bias.dim() == 3:
        bias = bias.reshape(-1, heads_in_batch, *bias.shape[1:])
    return bias.masked_fill(~keep, -math.inf)


def _install_module_call(gm: torch.fx.GraphModule, site: AttentionSite, target: str) -> torch.fx.Node:
    """``nn.MultiheadAttention`` as graph nodes around the sparse call: input projections (the module's own
    parameters), heads split, ``SparseAttention``, heads merged, ``out_proj``. Uses of ``output[0]`` read
    the result; ``output[1]`` (the weights, unused) is dropped."""
    graph = gm.graph
    path = str(site.module_target)
    module = gm.get_submodule(path)
    inputs = [site.query, site.key, site.value]
    if not module.batch_first:  # [L, N, E] → [N, L, E]
        inputs = [graph.call_method("transpose", (t, 0, 1)) for t in inputs]
    if module._qkv_same_embed_dim:
        weights = graph.call_function(torch.chunk, (graph.get_attr(f"{path}.in_proj_weight"), 3))
        weight_parts = [graph.call_function(operator.getitem, (weights, i)) for i in range(3)]
    else:
        weight_parts = [graph.get_attr(f"{path}.{name}_proj_weight") for name in ("q", "k", "v")]
    bias_parts: list[Any] = [None, None, None]
    if module.in_proj_bias is not None:
        biases = graph.call_function(torch.chunk, (graph.get_attr(f"{path}.in_proj_bias"), 3))
        bias_parts = [graph.call_function(operator.getitem, (biases, i)) for i in range(3)]
    heads = module.num_heads
    projected = []
    for tensor, weight, bias in zip(inputs, weight_parts, bias_parts):
        linear = graph.call_function(F.linear, (tensor, weight, bias))
        split = graph.call_method("unflatten", (linear, -1, (heads, -1)))
        projected.append(graph.call_method("transpose", (split, 1, 2)))
    attention = graph.call_module(target, tuple(projected))
    merged = graph.call_method("flatten", (graph.call_method("transpose", (attention, 1, 2)), -2))
    output = graph.call_module(f"{path}.out_proj", (merged,))
    if not module.batch_first:
        output = graph.call_method("transpose", (output, 0, 1))
    for user in list(site.node.users):
        if user.target is operator.getitem and user.args[1] == 0:
            user.replace_all_uses_with(output)
        graph.erase_node(user)
    return attention


def reshape_downstream_views(graph: torch.fx.Graph, node: torch.fx.Node) -> int:
    """Turn every ``view`` reading ``node``'s output through layout ops (transposes, views…) into
    ``reshape``. Returns how many were rewritten."""
    rewritten = 0
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        for user in list(current.users):
            if user in seen or user.args[:1] != (current,):
                continue
            seen.add(user)
            if user.op == "call_method" and user.target == "view":
                user.target = "reshape"
                rewritten += 1
            elif user.op == "call_function" and user.target in (aten.view.default, torch.Tensor.view):
                user.target = aten.reshape.default if user.target is aten.view.default else torch.reshape
                rewritten += 1
            elif not _is_call(user, _LAYOUT):
                continue
            stack.append(user)
    return rewritten


_ABSENT = object()


def _unique_target(gm: torch.fx.GraphModule, path: str) -> str:
    base = f"{path}.sas" if path else "sas"
    target, index = base, 1
    while get_attr_value(gm, target, _ABSENT) is not _ABSENT:
        target, index = f"{base}_{index}", index + 1
    return target
