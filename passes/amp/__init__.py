"""``amp``: mixed precision written into the graph — casts are ordinary nodes you can read, save and export.

``torch.autocast`` decides precision at run time and disappears at export; this pass writes the same
decisions into the graph (policy in ``policy.py``; dtype propagation and the clamping of constants in
``propagate.py``; the comparison with autocast in ``reference.py``):

1. Turn ``nn.Linear`` / ``nn.Conv{1,2,3}d`` call_module nodes into ``F.linear`` / ``F.conv*`` on
   ``get_attr`` parameters (symbolic-trace graphs), so their weights can be cast like any input.
2. ``causal_mask``: an SDPA whose mask is the causal mask built from shapes only gets
   ``is_causal=True`` and no mask (exact; the flash kernel, bf16/fp16 only, refuses explicit masks,
   and eager Hugging Face models take this shortcut themselves — capture turns it off).
3. Cast every float32 input of a low-precision op (matmul, linear, addmm, bmm, conv, SDPA, and any
   call_module whose module has ``low_precision_ok = True``) to ``dtype`` with
   ``aten._to_copy.default(x, dtype=...)``; parameters included (``per_step``: float32 master
   weights, cast where used; a weight used by several ops is cast once per forward).
4. Cast the inputs of ``keep_fp32`` ops, leaf modules holding float parameters (LayerNorm,
   Embedding...) and, with ``cast_outputs``, the graph's outputs back to their original dtype (``auto``:
   only when a ``loss_fn`` outside the graph reads them, so a user's loss runs in the precision it was
   written for; a graph that computes its own loss returns its outputs as computed, as under autocast — a
   float32 copy of a 50k-vocabulary logits output is 1.5 GiB at batch 8 × 1024, held at the compiled
   forward's peak); ops in
   neither list run in their inputs' dtype with type promotion, as under autocast.
5. Simplify: drop casts whose input already has the target dtype, replace ``cast(cast(y, wide),
   narrow)`` by ``y`` when ``y`` already is ``narrow`` (exact), merge casts of one value to one dtype.
6. Promote ops (``cat``, ``addcmul``, ``index_put``...) whose inputs now differ get them cast to
   the widest; export's ``_assert_tensor_metadata`` checks get the new dtypes.
7. ``cast_params=once``: trainable weights go through a ``LowPrecisionWeights`` module that keeps a
   low-precision copy until the float32 master changes; frozen weights used only in low precision
   are stored in ``dtype`` (no float32 copy, no cast).

Dtypes come from running the graph once (no grad) on the example inputs before and after inserting
casts. The convention for modules other passes install: a call_module whose module has a truthy
``low_precision_ok`` attribute receives low-precision inputs and must handle its own parameters.

Gradients always reach the float32 parameters as float32 (autograd of ``_to_copy``), so any
optimizer works unchanged. ``float16`` needs loss scaling: use ``torch.amp.GradScaler`` exactly as
with autocast (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import map_arg

from effcompile.canonical import causal_mask_candidates, is_causal_value, set_causal
from effcompile.errors import OptionError, PassError
from effcompile.graph import finalize, set_submodule
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.plans import ComputePrecision
from effcompile.program import Program

from .float8 import float8_requirement, swap_float8_linears
from .policy import DEFAULT_KEEP_FP32, KEEP_FP32_CLASSES, classify, is_known_op, keep_fp32_names, op_name
from .propagate import propagate_dtypes
from .reference import autocast_reference, compare_to_reference
from .weights import LowPrecisionWeights

log = logging.getLogger(__name__)
aten = torch.ops.aten

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CAST = aten._to_copy.default
WEIGHTS_MODULE = "amp_weights"
_META = "effcompile_amp"
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast never touches float64
_CONV = {torch.nn.Conv1d: F.conv1d, torch.nn.Conv2d: F.conv2d, torch.nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class AmpState:
    """What ``amp`` left on the program (``program.plan(AmpState)``): the low dtype, how parameters are cast,
    and with float8 the recipe and each linear's decision (``{module path: "float8 (...)" | "bf16: why"}``)."""

    dtype: str
    cast_params: str
    float8_recipe: str | None = None
    float8_linears: tuple[tuple[str, str], ...] = ()


@register
class Amp(Pass):
    """Mixed precision as graph nodes: low-precision matmuls and attention, float32 elsewhere."""

    name = "amp"
    summary = "mixed precision as explicit casts: bf16/fp16 matmuls and attention, fp32 master weights"
    exact = False
    after = ("lora", "lowrank", "sas", "fuse")  # precision is chosen on the final structure

    @dataclass(frozen=True)
    class Config:
        dtype: Literal["bfloat16", "float16", "float8"] = field(default="bfloat16", metadata={
            "help": "low-precision dtype of matmuls/attention (float16 needs torch.amp.GradScaler; float8: the "
                    "large linears in float8 through torchao, the rest bf16 — Hopper GPU only)"})
        float8_recipe: Literal["tensorwise", "rowwise"] = field(default="tensorwise", metadata={
            "help": "dtype=float8: torchao's scaling recipe (tensorwise: fastest; rowwise: more accurate)"})
        float8_min_dim: int = field(default=2048, metadata={
            "help": "dtype=float8: linears with min(in, out) below this stay bf16 (float8 loses on small GEMMs)"})
        keep_fp32: tuple[str, ...] = field(default=DEFAULT_KEEP_FP32, metadata={
            "help": "op classes (softmax, norm, reduction, loss, exp_log_pow, cumulative, fft) or op names kept "
                    "in float32; 'none' for no class"})
        cast_params: Literal["per_step", "once"] = field(default="per_step", metadata={
            "help": "per_step: float32 weights cast where used each forward; once: a low-precision copy "
                    "kept until the weight changes (frozen weights stored in low precision)"})
        cast_outputs: bool | Literal["auto"] = field(default="auto", metadata={
            "help": "cast floating graph outputs back to their original dtype: true, false (as computed, like "
                    "autocast: bf16 logits, float32 loss), or auto — true only when a loss_fn outside the graph "
                    "reads the outputs (so it computes in the precision it was written for)"})
        causal_mask: bool = field(default=True, metadata={
            "help": "give SDPA calls whose mask is a materialised causal mask is_causal=True instead (exact; "
                    "lets the flash kernel run)"})
        compare_autocast: bool = field(default=True, metadata={
            "help": "also run the model under torch.autocast and record the error against it"})

        def __post_init__(self) -> None:
            keep = tuple(k for k in self.keep_fp32 if k.lower() != "none")
            object.__setattr__(self, "keep_fp32", keep)
            unknown = [k for k in keep if not is_known_op(k)]
            if unknown:
                raise OptionError(f"amp: keep_fp32 entry {unknown[0]!r} is neither an op class "
                                  f"({', '.join(KEEP_FP32_CLASSES)}) nor an op name; fix --set amp.keep_fp32")
            if isinstance(self.float8_min_dim, bool) or not isinstance(self.float8_min_dim, int) or \
                    self.float8_min_dim < 16:
                raise OptionError(f"amp: float8_min_dim {self.float8_min_dim!r} must be a whole number ≥ 16")
            if self.dtype == "float8":
                missing = float8_requirement()
                if missing is not None:
                    raise OptionError(f"amp: dtype float8 needs {missing} for torchao's float8 training; "
                                      "use --set amp.dtype=bfloat16 here")

    def call(self, program: Program, config: Config) -> PassRecord:
        low = DTYPES.get(config.dtype, torch.bfloat16)  # float8: the linears chosen below, bf16 elsewhere
        previous = program.plan(AmpState)
        if previous is not None and previous.dtype != config.dtype:
            raise PassError(f"amp: the program is already in {previous.dtype}; run amp once "
                            f"(drop the second amp or its dtype={config.dtype})")
        gm, graph = program.gm, program.gm.graph
        existing = {n for n in graph.nodes if n.meta.get(_META)}
        converted = _functionalize_modules(gm)
        float8 = swap_float8_linears(gm, config.float8_recipe, config.float8_min_dim) \
            if config.dtype == "float8" and previous is None else {}
        asserts = relax_dtype_asserts(graph)
        gm.recompile()
        reference = autocast_reference(program, low) if config.compare_autocast else None
        candidates = causal_mask_candidates(gm) if config.causal_mask else []
        original, values, clamped = propagate_dtypes(program, keep={mask for _, mask in candidates})
        causal = [sdpa for sdpa, mask in candidates if is_causal_value(values.get(mask))]
        for sdpa in causal:
            set_causal(sdpa)
        fp32_names = keep_fp32_names(config.keep_fp32)

        classes: dict[torch.fx.Node, str] = {n: classify(gm, n, fp32_names) for n in graph.nodes}
        low_ops = [n for n, c in classes.items() if c == "low"]
        if not low_ops:  # the program is discarded: nothing above needs undoing
            return PassRecord(self.name, changed=False, reason="no matmul, linear, conv or attention op to run "
                              f"in {config.dtype}")
        cast_outputs = config.cast_outputs if config.cast_outputs != "auto" else program.loss_fn is not None
        inserter = _CastInserter(graph)
        for node in list(graph.nodes):
            kind = classes.get(node, "other")
            if kind == "low":
                inserter.cast_inputs(node, lambda v: original.get(v) in _CASTABLE and original[v] != low,
                                     lambda v: low)
            elif kind in ("fp32", "module_fp32") or (node.op == "output" and cast_outputs):
                inserter.cast_inputs(node, lambda v: _is_float(original.get(v)), lambda v: original[v])
        current, _, clamped_now = propagate_dtypes(program, recompile=True)
        clamped.update(clamped_now)
        removed = _simplify(graph, current)
        promoted = _promote(graph, classes, current, inserter)
        if promoted:
            current, _, clamped_now = propagate_dtypes(program, recompile=True)
            clamped.update(clamped_now)
        _restore_dtype_asserts(asserts, current)
        stored_low, cached = _cast_params_once(gm, low) if config.cast_params == "once" else ([], 0)
        finalize(gm)

        alive = set(graph.nodes)
        casts = [n for n in graph.nodes if n.meta.get(_META) == "cast"]
        to_low = sum(1 for n in casts if n.kwargs["dtype"] == low)
        changed = bool(converted or float8 or stored_low or cached or causal or clamped or
                       any(n not in existing for n in graph.nodes if n.meta.get(_META)))
        program.set_plan(AmpState(config.dtype, config.cast_params,
                                  config.float8_recipe if config.dtype == "float8" else None,
                                  tuple(float8.items())))
        program.set_plan(ComputePrecision(low))
        op_counts = Counter(op_name(n) or str(n.target) for n in low_ops if n.op != "call_module")
        op_counts.update("module" for n in low_ops if n.op == "call_module")
        details: dict[str, Any] = {
            "summary": f"{len(low_ops)} ops in {config.dtype} ({_describe(op_counts)}); {len(casts)} casts "
                       f"({to_low} to {config.dtype}, {len(casts) - to_low} back to float32)",
            "low_precision_ops": dict(op_counts), "casts": len(casts), "casts_to_low": to_low,
            "casts_to_fp32": len(casts) - to_low, "casts_removed_by_simplification": removed,
            "promoted_inputs": promoted, "modules_functionalized": converted,
            "fp32_ops": dict(Counter(op_name(n) or type(gm.get_submodule(str(n.target))).__name__
                                     for n, c in classes.items() if c == "fp32" and n in alive)),
            "params_stored_low": stored_low, "params_cached": cached, "sdpa_made_causal": len(causal),
            "constants_clamped": clamped,
        }
        if clamped:
            details["summary"] += f"; {len(clamped)} constants clamped to {config.dtype}'s range"
        if float8:
            chosen = sum(1 for decision in float8.values() if decision.startswith("float8"))
            details["float8_linears"] = float8
            details["summary"] += f"; {chosen} of {len(float8)} linears in float8 ({config.float8_recipe})"
        if reference is not None:
            details["autocast"] = compare_to_reference(program, reference)
            error = details["autocast"]["output_max_rel"]
            details["summary"] += f"; vs torch.autocast {error:.1e}" if isinstance(error, float) else ""
        record = PassRecord(self.name, changed=changed, reason="" if changed else "already in mixed precision",
                            stats={"casts": len(casts), "low_precision_ops": len(low_ops)}, details=details)
        return record


def _describe(counts: Counter) -> str:
    return ", ".join(f"{count} {name}" for name, count in counts.most_common())


def _is_float(dtype: torch.dtype | None) -> bool:
    return dtype is not None and dtype.is_floating_point


class _CastInserter:
    """Creates cast nodes right before their first consumer, one per (value, dtype)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph
        self.casts: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}

    def cast(self, value: torch.fx.Node, dtype: torch.dtype, before: torch.fx.Node) -> torch.fx.Node:
        """A node computing ``value.to(dtype)``, created before ``before`` unless one exists."""
        key = (value, dtype)
        if key not in self.casts:
            with self.graph.inserting_before(before):
                node = self.graph.call_function(CAST, (value,), {"dtype": dtype})
            node.meta[_META] = "cast"
            for meta_key in ("nn_module_stack", "stack_trace"):
                if meta_key in before.meta:
                    node.meta[meta_key] = before.meta[meta_key]
            self.casts[key] = node
        return self.casts[key]

    def cast_inputs(self, node: torch.fx.Node, wanted: Any, target: Any) -> None:
        """Replace each input ``v`` of ``node`` with ``wanted(v)`` by a cast of it to ``target(v)``."""
        def replace(value: torch.fx.Node) -> torch.fx.Node:
            if value.meta.get(_META) == "cast" or not wanted(value):
                return value
            return self.cast(value, target(value), node)

        node.args = map_arg(node.args, replace)
        node.kwargs = map_arg(node.kwargs, replace)


def _pure_cast(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.dtype] | None:
    """(source, dtype) if ``node`` only changes its input's dtype (ours or the model's own ``.to(dtype)``)."""
    if node.op == "call_function" and node.target is CAST and set(node.kwargs) == {"dtype"}:
        return node.args[0], node.kwargs["dtype"]
    if node.op == "call_function" and node.target is aten.to.dtype and len(node.args) == 2 and not any(
            node.kwargs.get(k) for k in ("non_blocking", "copy", "memory_format")):
        return node.args[0], node.args[1]
    return None


def _simplify(graph: torch.fx.Graph, dtypes: dict[torch.fx.Node, torch.dtype | None]) -> int:
    """Remove no-op casts and exact round trips, merge duplicate casts; returns how many casts went."""
    removed = 0
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.meta.get(_META) != "cast":
            continue
        source, dtype = node.args[0], node.kwargs["dtype"]
        replacement = None
        if dtypes.get(source) == dtype:
            replacement = source
        else:
            inner = _pure_cast(source) if isinstance(source, torch.fx.Node) else None
            # cast(cast(y, wide), narrow) == y when y already is narrow: widening is exact.
            if inner is not None and dtypes.get(inner[0]) == dtype and \
                    _itemsize(dtypes.get(source)) >= _itemsize(dtype):
                replacement = inner[0]
        if replacement is None:
            for other in list(source.users):  # an earlier cast of the same value to the same dtype
                cast = _pure_cast(other)
                if other is not node and cast is not None and cast[1] == dtype and order[other] < order[node]:
                    replacement = other
                    break
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            removed += 1
    return removed


def _itemsize(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype is not None else 0


def _promote(graph: torch.fx.Graph, classes: dict[torch.fx.Node, str],
             dtypes: dict[torch.fx.Node, torch.dtype | None], inserter: _CastInserter) -> int:
    """Cast mixed-dtype inputs of promote ops to the widest of them; returns how many inputs were cast."""
    promoted = 0
    for node, kind in classes.items():
        if kind != "promote":
            continue
        inputs = [dtypes.get(v) for v in node.all_input_nodes if _is_float(dtypes.get(v))]
        if len(set(inputs)) <= 1:
            continue
        widest = max(inputs, key=_itemsize)

        def wanted(value: torch.fx.Node, widest: torch.dtype = widest) -> bool:
            return _is_float(dtypes.get(value)) and dtypes.get(value) != widest

        promoted += sum(1 for v in node.all_input_nodes if wanted(v))
        inserter.cast_inputs(node, wanted, lambda v, widest=widest: widest)
    return promoted


def relax_dtype_asserts(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Drop the float dtype from export's ``_assert_tensor_metadata`` checks (they pin the capture-time
    dtype, so the graph fails under ``torch.autocast`` or after casts); returns the nodes changed.
    Call ``recompile()`` on the GraphModule afterwards."""
    relaxed = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            dtype = node.kwargs.get("dtype")
            if dtype is not None and dtype.is_floating_point:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
                relaxed.append(node)
    return relaxed


def _restore_dtype_asserts(asserts: list[torch.fx.Node], dtypes: dict[torch.fx.Node, torch.dtype | None]) -> None:
    for node in asserts:
        dtype = dtypes.get(node.args[0])
        if dtype is not None:
            node.kwargs = {**node.kwargs, "dtype": dtype}


def _functionalize_modules(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``nn.Linear`` / ``nn.Conv*d`` (zero padding) call_module nodes as functional calls on
    get_attr parameters (exact). Returns how many were rewritten."""
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) != 1:
            continue
        module = gm.get_submodule(str(node.target))
        function = F.linear if type(module) is torch.nn.Linear else _CONV.get(type(module))
        if function is None or (function is not F.linear and module.padding_mode != "zeros"):
            continue
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            extra = () if function is F.linear else (module.stride, module.padding, module.dilation, module.groups)
            new = graph.call_function(function, (node.args[0], weight, bias, *extra))
        stack = dict(node.meta.get("nn_module_stack", {}))
        stack.setdefault(str(node.target), (str(node.target), type(module)))
        for created in (weight, bias, new):
            if created is not None:
                created.meta["nn_module_stack"] = stack
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def _cast_params_once(gm: torch.fx.GraphModule, low: torch.dtype) -> tuple[list[str], int]:
    """``cast_params=once``: store frozen weights used only in ``low`` in ``low``; route trainable
    weights' casts through a ``LowPrecisionWeights`` cache. Returns (stored names, cached count)."""
    graph = gm.graph
    uses: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            uses.setdefault(str(node.target), []).append(node)
    stored, cached = [], 0
    for target, getters in uses.items():
        value = gm.get_parameter(target) if _is_parameter(gm, target) else None
        if value is None or value.dtype != torch.float32:
            continue
        users = [u for g in getters for u in g.users]
        low_casts = [u for u in users if u.meta.get(_META) == "cast" and u.kwargs["dtype"] == low]
        if not low_casts:
            continue
        if not value.requires_grad and len(low_casts) == len(users):
            owner, _, leaf = target.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, leaf,
                    torch.nn.Parameter(value.detach().to(low), requires_grad=False))
            for cast in low_casts:
                cast.replace_all_uses_with(cast.args[0])
                graph.erase_node(cast)
            stored.append(target)
            continue
        if not hasattr(gm, WEIGHTS_MODULE):
            set_submodule(gm, WEIGHTS_MODULE, LowPrecisionWeights(low))
        for cast in low_casts:
            with graph.inserting_before(cast):
                cached_node = graph.call_module(WEIGHTS_MODULE, (cast.args[0], target))
            cached_node.meta.update({k: v for k, v in cast.meta.items()})
            cached_node.meta[_META] = "weight_cache"
            cast.replace_all_uses_with(cached_node)
            graph.erase_node(cast)
            cached += 1
    return stored, cached


def _is_parameter(gm: torch.nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False
