"""``sas``: structured attention sparsification — make every attention block-sparse.

1. Find each attention (``scaled_dot_product_attention``, or the explicit
   ``matmul → [scale] → [mask] → softmax → [dropout] → matmul``) with the shared matcher, and read its scale,
   mask (additive, boolean, or ``masked_fill(-inf)``), dropout, causality and GQA sharing.
2. Replace it with a call to a ``SparseAttention`` module installed at ``<attention module>.sas`` that takes
   ``(query, key, value, attn_mask, scale)``; the chain it replaces is removed.
3. Run the model once (dense, no grad) to see each attention's shape and mask. A mask that admits nothing
   above the diagonal makes the attention causal (only tiles on/below the diagonal are candidates); a mask
   that *is* the causal mask and depends only on shapes (Hugging Face's SDPA path passes one instead of
   ``is_causal``) is dropped, so kernels skip masking on full tiles.
4. Choose each head's tile mask: a fixed pattern (``local``, ``block``, ``strided``, ``global``, ``mixed``,
   ``dense``) or ``importance``: ``calib_steps`` forward/backward passes scoring each tile by Σ|A|·|∂L/∂A|,
   keeping the diagonal and the top tiles up to ``density`` of the candidate tiles.
5. The mask is a buffer of the module (saved with it); ``backend=auto`` runs FlexAttention on CUDA and the
   block-gather kernel elsewhere (see ``_sas_kernels``). Approximate: verification reports the error.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F

from effcompile.errors import OptionError, PassError
from effcompile.graph import depends_on_input_data, finalize, set_submodule
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.patterns import AttentionSite, find_attention
from effcompile.program import Program

from .kernels import BACKENDS, SparseAttention
from .patterns import (
    candidate_tiles,
    fixed_pattern,
    head_patterns,
    select_important_tiles,
    tile_density,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten

PATTERNS = ("local", "block", "strided", "global", "mixed", "importance", "dense")
HEAD_PATTERNS = ("local", "block", "strided", "global", "dense")
_ASSERTIONS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
_DTYPE_OPS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.to.dtype_layout}
_DTYPE_METHODS = {"to", "type_as", "float", "half", "bfloat16", "clone"}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"}
_DIV = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div"}
_ADD = {operator.add, torch.add, aten.add.Tensor, "add"}
_MASKED_FILL = {aten.masked_fill.Scalar, torch.masked_fill, "masked_fill"}
_DROPOUT = {F.dropout, aten.dropout.default}
# masked_fill values at or below this count as "masked out" (HF uses finfo.min, others -1e4 or -inf).
_MASKED_VALUE = -1e4


@dataclass
class _Plan:
    """How one attention maps onto ``SparseAttention``'s arguments."""

    site: AttentionSite
    key_transposed: bool = False
    mask: Any = None
    mask_kind: str | None = None  # "additive" | "bool" | "fill" (masked_fill: True = masked out)
    mask_scale: float = 1.0
    scale: float | None = None
    scale_ops: list[tuple[str, Any]] = field(default_factory=list)  # runtime (op, node) scale factors
    dropout_p: float = 0.0
    causal: bool = False
    chain: list[torch.fx.Node] = field(default_factory=list)


def _is_call(node: Any, targets: set) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in targets


def _plan_sdpa(site: AttentionSite) -> _Plan | str:
    if site.scale is not None and not isinstance(site.scale, (int, float)):
        return "the scale is computed at run time"
    plan = _Plan(site, mask=site.attn_mask, scale=None if site.scale is None else float(site.scale),
                 dropout_p=site.dropout_p, causal=site.is_causal, chain=[site.node])
    if isinstance(site.attn_mask, torch.fx.Node):
        plan.mask_kind = "auto"  # bool or additive: the module decides from the tensor's dtype
    elif site.attn_mask is not None:
        return "attn_mask is not a tensor"
    return plan


def _plan_explicit(site: AttentionSite) -> _Plan | str:
    plan = _Plan(site, key_transposed=True, scale=1.0, chain=[site.node])
    current = site.node.args[0]
    while isinstance(current, torch.fx.Node) and not _is_softmax(current):
        plan.chain.append(current)
        if _is_call(current, _DROPOUT):
            p = current.args[1] if len(current.args) > 1 else current.kwargs.get("p", 0.5)
            train = current.args[2] if len(current.args) > 2 else current.kwargs.get("training", current.kwargs.get("train", True))
            if not isinstance(p, (int, float)) or not isinstance(train, bool):
                return "dropout probability is computed at run time"
            plan.dropout_p = float(p) if train else 0.0
        elif not (_is_call(current, _DTYPE_OPS) or _is_call(current, _DTYPE_METHODS)):
            return f"unsupported op {current.target} between softmax and the value matmul"
        current = current.args[0]
    softmax = current
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim", -1)
    shape = softmax.meta.get("val").shape if hasattr(softmax.meta.get("val"), "shape") else None
    if dim != -1 and not (shape is not None and dim == len(shape) - 1):
        return f"softmax over dim {dim}, not the last"
    plan.chain.append(softmax)
    ops: list[torch.fx.Node] = []
    current = softmax.args[0]
    while isinstance(current, torch.fx.Node) and tuple(current.args[:2]) != (site.query, site.key):
        ops.append(current)
        current = current.args[0] if current.args else None
    if not isinstance(current, torch.fx.Node):
        return "the score matmul was not found"
    plan.chain.append(current)
    for node in reversed(ops):  # score matmul → softmax order
        plan.chain.append(node)
        other = node.args[1] if len(node.args) > 1 else None
        if _is_call(node, _MUL) or _is_call(node, _DIV):
            divide = _is_call(node, _DIV)
            if isinstance(other, (int, float)):
                factor = 1.0 / other if divide else float(other)
                plan.scale = (plan.scale or 1.0) * factor
                plan.mask_scale *= factor if plan.mask_kind == "additive" else 1.0
            elif isinstance(other, torch.fx.Node) and _numel(other) in (None, 1):
                if plan.mask_kind == "additive":
                    return "a run-time scale after an additive mask"
                plan.scale_ops.append(("div" if divide else "mul", other))
            else:
                return "scores multiplied by a tensor"
        elif _is_call(node, _ADD):
            if plan.mask is not None:
                return "more than one mask"
            plan.mask, plan.mask_kind = other, "additive"
        elif _is_call(node, _MASKED_FILL):
            value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            if plan.mask is not None:
                return "more than one mask"
            if not isinstance(value, (int, float)) or value > _MASKED_VALUE:
                return f"masked_fill with value {value!r} (only large negative values mask)"
            plan.mask, plan.mask_kind = other, "fill"
        elif not (_is_call(node, _DTYPE_OPS) or _is_call(node, _DTYPE_METHODS)):
            return f"unsupported op {node.target} between the score matmul and softmax"
    return plan


def _is_softmax(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in {torch.softmax, F.softmax, aten._softmax.default,
                                                            aten.softmax.int, torch.Tensor.softmax}) or \
        (node.op == "call_method" and node.target == "softmax")


def _numel(node: torch.fx.Node) -> int | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.numel()
    return None if value is None or not isinstance(value, (int, float)) else 1


def _unique_target(gm: torch.fx.GraphModule, path: str) -> str:
    base = f"{path}.sas" if path else "sas"
    target, index = base, 1
    while _has_attr(gm, target):
        target, index = f"{base}_{index}", index + 1
    return target


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    value: Any = gm
    for part in target.split("."):
        if not hasattr(value, part):
            return False
        value = getattr(value, part)
    return True


@register
class StructuredAttentionSparsity(Pass):
    """Make attention block-sparse with per-head tile masks (fixed patterns or importance-learned)."""

    name = "sas"
    summary = "block-sparse attention: fixed or importance-learned tile masks, FlexAttention/block-gather kernels"
    exact = False

    @dataclass(frozen=True)
    class Config:
        pattern: Literal["local", "block", "strided", "global", "mixed", "importance", "dense"] = field(
            default="local", metadata={"help": "tile pattern per head: local window, block-diagonal, strided, "
                                               "global+local, mixed (per-head list), importance (learned), dense"})
        density: float = field(default=0.25, metadata={
            "help": "importance: fraction of the candidate (causal) tiles kept per head, diagonal included"})
        block_size: int = field(default=128, metadata={"help": "tile size in tokens (queries and keys)"})
        window: int = field(default=512, metadata={"help": "local/global/mixed: window in tokens"})
        block: int = field(default=512, metadata={"help": "block: tokens per block (a multiple of block_size)"})
        stride: int = field(default=512, metadata={"help": "strided: stride in tokens (a multiple of block_size)"})
        n_global: int = field(default=128, metadata={"help": "global: leading tokens that attend/are attended everywhere"})
        heads: tuple[str, ...] = field(default=(), metadata={
            "help": "mixed: comma-separated per-head patterns, cycled (default: half local, half strided)"})
        calib_steps: int = field(default=2, metadata={"help": "importance: forward/backward passes to score tiles"})
        warmup: int = field(default=0, metadata={
            "help": "importance: run dense for the first N training forward passes (micro-batches), scoring tiles "
                    "on the training data, then re-select the tiles from those scores (0: keep the tiles scored "
                    "at compile time on the example inputs)"})
        backend: Literal["auto", "flex", "gather", "reference"] = field(default="auto", metadata={
            "help": "kernel: auto (flex on CUDA, gather elsewhere), flex, gather, reference (masked SDPA)"})

        def __post_init__(self) -> None:
            if self.pattern not in PATTERNS:
                raise OptionError(f"sas: pattern {self.pattern!r} is unknown; use one of {', '.join(PATTERNS)}")
            if self.backend not in BACKENDS:
                raise OptionError(f"sas: backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
            if self.block_size < 1:
                raise OptionError(f"sas: block_size {self.block_size} must be a positive number of tokens; "
                                  "set e.g. --set sas.block_size=128")
            if not 0 < self.density <= 1:
                raise OptionError(f"sas: density {self.density} must be in (0, 1]; set e.g. --set sas.density=0.25")
            for option in ("window", "block", "stride"):
                if getattr(self, option) < 1:
                    raise OptionError(f"sas: {option} {getattr(self, option)} must be at least 1 token")
            for option in ("block", "stride"):
                if getattr(self, option) % self.block_size:
                    raise OptionError(f"sas: {option} {getattr(self, option)} is not a multiple of block_size "
                                      f"{self.block_size}; set --set sas.{option}=<k·{self.block_size}>")
            if self.n_global < 0:
                raise OptionError(f"sas: n_global {self.n_global} must be ≥ 0")
            if self.calib_steps < 1:
                raise OptionError(f"sas: calib_steps {self.calib_steps} must be ≥ 1")
            if self.warmup < 0:
                raise OptionError(f"sas: warmup {self.warmup} must be ≥ 0 forward passes")
            if self.warmup and self.pattern != "importance":
                raise OptionError("sas: warmup re-scores the importance pattern; set --set sas.pattern=importance "
                                  "or drop sas.warmup")
            bad = [h for h in self.heads if h not in HEAD_PATTERNS]
            if bad:
                raise OptionError(f"sas: heads lists unknown pattern {bad[0]!r}; use {', '.join(HEAD_PATTERNS)}")
            if self.heads and self.pattern != "mixed":
                raise OptionError("sas: heads is only used with pattern=mixed; set --set sas.pattern=mixed")

    def call(self, program: Program, config: Config) -> PassRecord:
        gm = program.gm
        sites = find_attention(gm)
        if not sites:
            existing = sum(isinstance(m, SparseAttention) for m in gm.modules())
            reason = (f"attention is already block-sparse ({existing} sas modules)" if existing else
                      "no attention found (no scaled_dot_product_attention or matmul-softmax-matmul)")
            return PassRecord(self.name, changed=False, reason=reason)
        plans: list[_Plan] = []
        skipped: list[dict[str, str]] = []
        for site in sites:
            plan = _plan_sdpa(site) if site.kind == "sdpa" else _plan_explicit(site)
            if isinstance(plan, str):
                skipped.append({"path": site.path, "reason": plan})
            else:
                plans.append(plan)
        if not plans:
            return PassRecord(self.name, changed=False, reason=f"no attention could be rewritten: {skipped[0]['reason']}",
                              details={"skipped": skipped})
        installed = [self._install(gm, plan, config) for plan in plans]
        finalize(gm)
        self._probe(program, installed)
        sites_details = []
        for plan, (_, node, module) in zip(plans, installed):
            sites_details.append(self._decide_mask(gm, plan, node, module))
        finalize(gm)
        if config.pattern == "importance":
            self._calibrate(program, [m for _, _, m in installed], config.calib_steps)
        masks: dict[str, torch.Tensor] = {}
        for detail, (target, _, module) in zip(sites_details, installed):
            module.tile_mask = self._tile_mask(module, config).to(module.tile_mask.device)
            module.mode, module.backend, module.importance = "sparse", config.backend, None
            if config.warmup:
                module.mode, module.warmup_left, module.density = "warmup", config.warmup, config.density
            if set(head_patterns(module.observed["heads"], config.pattern, config.heads)) == {"block"}:
                module.chunk = config.block
            masks[target] = module.tile_mask.detach().cpu().clone()
            detail["chunk"] = module.chunk  # >0: backend=auto runs the chunked (dense-over-chunks) kernel
            detail.update(target=target, tiles=list(module.tile_mask.shape),
                          density=round(tile_density(module.tile_mask, module.causal), 4),
                          kept_tiles=int(module.tile_mask.sum()))
            if module.dropout_p > 0 and config.backend == "flex":
                raise PassError(f"sas: {detail['path']} uses dropout {module.dropout_p}, which FlexAttention "
                                "cannot apply; use --set sas.backend=auto or gather")
        program.meta["sas.block_masks"] = masks
        density = sum(d["density"] for d in sites_details) / len(sites_details)
        summary = (f"{len(installed)} attention{'s' if len(installed) > 1 else ''} → block-sparse "
                   f"{config.pattern}, {density:.0%} of candidate tiles kept (tile {config.block_size})")
        if skipped:
            summary += f"; {len(skipped)} skipped"
        return PassRecord(self.name, changed=True, stats={"attention_sites": len(sites), "rewritten": len(installed),
                                                          "skipped": len(skipped), "density": round(density, 4)},
                          details={"summary": summary, "sites": sites_details, "skipped": skipped})

    def _install(self, gm: torch.fx.GraphModule, plan: _Plan,
                 config: Config) -> tuple[str, torch.fx.Node, SparseAttention]:
        site = plan.site
        graph = gm.graph
        exported = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes)
        module = SparseAttention(config.block_size, plan.causal, plan.scale, plan.dropout_p, "reference")
        device = next((p.device for p in gm.parameters()), None)
        if device is not None:  # the tile mask lives with the model (FlexAttention needs it on the GPU)
            module.to(device)
        module.mode = "probe"
        target = _unique_target(gm, site.path)
        set_submodule(gm, target, module)
        with graph.inserting_before(site.node):
            key = site.key
            if plan.key_transposed:
                key = graph.call_function(aten.transpose.int if exported else torch.transpose, (key, -2, -1))
            mask = plan.mask
            if plan.mask_kind == "fill":
                mask = graph.call_function(aten.logical_not.default if exported else torch.logical_not, (mask,))
            elif plan.mask_kind == "additive" and plan.mask_scale != 1.0:
                mask = graph.call_function(operator.mul, (mask, plan.mask_scale))
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
            node = graph.call_module(target, (site.query, key, site.value), kwargs)
        node.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        site.node.replace_all_uses_with(node)
        chain = set(plan.chain)
        for candidate in list(graph.nodes):
            if candidate.op == "call_function" and candidate.target in _ASSERTIONS and \
                    any(arg in chain for arg in candidate.all_input_nodes) and not candidate.users:
                graph.erase_node(candidate)
        # Erase the replaced chain explicitly: dead-code elimination keeps random ops (SDPA, dropout).
        for candidate in reversed(list(graph.nodes)):
            if candidate in chain and not candidate.users:
                graph.erase_node(candidate)
        return target, node, module

    def _probe(self, program: Program, installed: list[tuple[str, torch.fx.Node, SparseAttention]]) -> None:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            program.run()
        missing = [target for target, _, module in installed if not module.observed]
        if missing:
            raise PassError(f"sas: attention {missing[0]} did not run on the example inputs; "
                            "give inputs that reach every attention")

    def _decide_mask(self, gm: torch.fx.GraphModule, plan: _Plan, node: torch.fx.Node,
                     module: SparseAttention) -> dict[str, Any]:
        observed = module.observed
        mask_info = observed.get("mask")
        mask_handling = "none"
        if mask_info is not None:
            if mask_info["within_causal"]:
                module.causal = True
            mask_node = node.kwargs.get("attn_mask")
            data_dependent = isinstance(mask_node, torch.fx.Node) and depends_on_input_data(mask_node)
            if mask_info["exactly_causal"] and not data_dependent:
                node.update_kwarg("attn_mask", None)
                mask_handling = "causal mask replaced by causal tiles"
            else:
                mask_handling = f"{mask_info['kind']} mask applied within kept tiles"
        return {"path": plan.site.path, "kind": plan.site.kind, "heads": observed["heads"],
                "kv_heads": observed["kv_heads"], "query_len": observed["query_len"], "key_len": observed["key_len"],
                "causal": module.causal, "mask": mask_handling, "dropout_p": module.dropout_p}

    def _calibrate(self, program: Program, modules: list[SparseAttention], steps: int) -> None:
        for module in modules:
            module.mode, module.importance = "calibrate", None
        gm = program.gm
        with torch.random.fork_rng(devices=[]):
            for _ in range(steps):
                objective = program.objective(program.run())
                if not objective.requires_grad:
                    raise PassError("sas: pattern=importance needs a differentiable loss, but the objective "
                                    "has no gradient; unfreeze parameters or use a fixed pattern")
                objective.backward()
        for parameter in gm.parameters():
            parameter.grad = None
        for module in modules:
            if module.importance is None:
                raise PassError("sas: no gradient reached an attention during calibration; "
                                "use a fixed pattern such as --set sas.pattern=local")

    def _tile_mask(self, module: SparseAttention, config: Config) -> torch.Tensor:
        observed = module.observed
        rows = math.ceil(observed["query_len"] / config.block_size)
        cols = math.ceil(observed["key_len"] / config.block_size)
        if config.pattern == "importance":
            assert module.importance is not None
            return select_important_tiles(module.importance, module.causal, config.density)
        patterns = head_patterns(observed["heads"], config.pattern, config.heads)
        if len(set(patterns)) == 1:
            tiles = fixed_pattern(patterns[0], rows, cols, config.block_size, module.causal, window=config.window,
                                  block=config.block, stride=config.stride, n_global=config.n_global)
            return tiles[None]
        return torch.stack([fixed_pattern(p, rows, cols, config.block_size, module.causal, window=config.window,
                                          block=config.block, stride=config.stride, n_global=config.n_global)
                            for p in patterns])


__all__ = ["StructuredAttentionSparsity", "SparseAttention", "candidate_tiles"]
