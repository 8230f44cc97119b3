"""``fuse``: replace the subgraphs that have a fused training kernel by one call each — by graph pattern,
for any architecture (no model class names).

1. Match, in graph order (``matchers.py``; every candidate that does not match is recorded with the node
   where the pattern broke):
   * ``rms_norm``: ``[x.float()] → pow 2 / x·x → mean(-1, keepdim) → + eps → rsqrt → · x → [cast] →
     [(1 +) w · ·] → [cast]`` (Llama, Mistral, Qwen, T5; Gemma's ``1 + w``), ``nn.RMSNorm``, ``F.rms_norm``;
   * ``layer_norm``: ``aten.layer_norm``, ``F.layer_norm``, ``nn.LayerNorm`` over the last dimension;
   * ``glu``: ``act(a) * b`` with ``act`` = SiLU (SwiGLU), GELU tanh or erf (GeGLU);
   * ``rope``: ``x·cos + rotate_half(x)·sin`` with ``rotate_half`` = ``cat(-x[..., h:], x[..., :h])``; the
     query and key rotations of one attention (same ``cos``/``sin``) become one call;
   * ``linear_cross_entropy``: the loss head (``effcompile.patterns.match_loss_head``, shared with ``remat``)
     with a mean or sum reduction (per-token losses are left to ``remat``'s chunked head).
2. Replace each by a call of ``ops.<fusion>`` (backend ``liger`` on CUDA, ``reference`` elsewhere; ``auto``
   picks): exact PyTorch kernels saving only what Liger's kernels save (RMSNorm: ``x`` and a float32 rstd;
   GLU: ``a`` and ``b``; RoPE: ``cos``/``sin``; the loss head: its input gradients, the logits never whole).
3. Export (ONNX) traces the plain ops; ``torch.compile`` sees the loss head as an opaque custom op and, by
   default, the other fusions' plain ops (Inductor fuses them itself; ``compiled=kernels`` keeps RMSNorm and
   the GLU as custom ops).

Exactness: with the reference kernels outputs equal the original's and gradients match to float32 round-off
(the pass is exact). With Liger's kernels on float32 tensors the same holds to kernel round-off (within the
exact tolerance); on bf16/fp16 tensors the kernels round differently from the unfused ops, so the pass then
declares itself approximate and verification records the error (``--max-error`` bounds it).

Order: after ``lora``, ``lowrank`` and ``sas`` (it fuses what they leave), before ``amp`` (amp casts the
fused norms' inputs to float32 and the loss head's to the low dtype, as autocast would) and ``remat`` (which
plans around the fused ops, and finds no loss head left to chunk).
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from effcompile.errors import OptionError
from effcompile.graph import finalize
from effcompile.pass_manager import Pass, PassRecord, register
from effcompile.patterns import HeadSite, NoMatch, match_loss_head
from effcompile.program import Program

from . import liger, ops
from .matchers import (
    Site,
    match_glu,
    match_layer_norm,
    match_rms_norm,
    match_rms_norm_module,
    match_rope,
    pair_rope,
)

log = logging.getLogger(__name__)

FUSIONS = ("rms_norm", "layer_norm", "glu", "rope", "linear_cross_entropy")
FUSED_TARGETS = {ops.rms_norm: "rms_norm", ops.layer_norm: "layer_norm", ops.gated_activation: "glu",
                 ops.rotary_embedding: "rope", ops.linear_cross_entropy: "linear_cross_entropy"}


def fused_kind(node: torch.fx.Node) -> str | None:
    """The fusion a node calls (``rms_norm``, ``glu``...) if it is one of ``fuse``'s ops, else None."""
    return FUSED_TARGETS.get(node.target) if node.op == "call_function" else None


@register
class Fuse(Pass):
    """Replace norms, gated activations, rotary embeddings and the loss head by fused kernels."""

    name = "fuse"
    summary = "fused kernels (Liger on CUDA, exact PyTorch on CPU) for RMSNorm, LayerNorm, SwiGLU/GeGLU, RoPE, linear+CE"
    exact = True
    after = ("lora", "lowrank", "sas")  # and before amp and remat (their `after` lists name fuse)

    @dataclass(frozen=True)
    class Config:
        fusions: tuple[str, ...] = field(default=FUSIONS, metadata={
            "help": "which fusions (comma-separated): rms_norm, layer_norm, glu, rope, linear_cross_entropy"})
        backend: Literal["auto", "liger", "reference"] = field(default="auto", metadata={
            "help": "auto: Liger-Kernel on CUDA when installed, else the exact PyTorch kernels; liger; reference"})
        compiled: Literal["inductor", "kernels"] = field(default="inductor", metadata={
            "help": "under torch.compile: inductor traces the norms/GLU/RoPE as plain ops (Inductor fuses them), "
                    "kernels keeps RMSNorm and GLU as opaque custom ops; the loss head is always a custom op"})
        head_rows: int = field(default=0, metadata={
            "help": "rows per loss-head chunk (reference kernel; 0: about 256 MiB of float32 logits)"})

        def __post_init__(self) -> None:
            unknown = [f for f in self.fusions if f not in FUSIONS]
            if unknown:
                raise OptionError(f"fuse: fusions {', '.join(unknown)} unknown; choose from {', '.join(FUSIONS)}")
            if isinstance(self.head_rows, bool) or not isinstance(self.head_rows, int) or self.head_rows < 0:
                raise OptionError(f"fuse: head_rows {self.head_rows!r} must be a whole number ≥ 0 (0: automatic)")
            if self.backend == "liger" and not (torch.cuda.is_available() and liger.available()):
                missing = "a CUDA GPU" if not torch.cuda.is_available() else "liger-kernel (pip install 'effcompile[fuse]')"
                raise OptionError(f"fuse: backend liger needs {missing}; use --set fuse.backend=auto (Liger where "
                                  "available) or reference")

    def call(self, program: Program, config: Config) -> PassRecord:
        gm = program.gm
        existing = Counter(kind for n in gm.graph.nodes if (kind := fused_kind(n)))
        options = {"backend": config.backend, "compiled": config.compiled}
        fused: dict[str, list[str]] = {kind: [] for kind in config.fusions}
        misses: dict[str, list[str]] = {kind: [] for kind in config.fusions}
        for kind in config.fusions:
            sites, missed = _find(gm, kind)
            misses[kind].extend(m.describe() for m in missed)
            if kind == "rope":
                for first, second in pair_rope(sites):
                    _replace_rope(gm.graph, first, second, options)
                    fused[kind].append(first.path or first.output.name)
            elif kind == "linear_cross_entropy":
                for site in sites:
                    _replace_head(gm.graph, site, options, config.head_rows)
                    fused[kind].append(site.name)
            else:
                for site in sites:
                    _replace(gm.graph, site, options)
                    fused[kind].append(site.path or site.output.name)
        counts = {kind: len(paths) for kind, paths in fused.items()}
        resolved = _resolved_backend(program, config.backend)
        self.exact = resolved == "reference" or not _low_precision(program)
        details = {"summary": _summary(counts, existing, resolved), "counts": counts, "fused": fused,
                   "not_matched": {k: v for k, v in misses.items() if v}, "backend": resolved,
                   "compiled": config.compiled, "already_fused": dict(existing)}
        if not any(counts.values()):
            reason = (f"already fused ({_describe(existing)})" if existing else
                      "no norm, gated activation, rotary embedding or linear + cross-entropy head matched")
            return PassRecord(self.name, changed=False, reason=reason, details=details)
        finalize(gm)
        log.info("fuse: %s", details["summary"])
        return PassRecord(self.name, changed=True, stats={f"fused_{k}": v for k, v in counts.items()}, details=details)


def _find(gm: torch.fx.GraphModule, kind: str) -> tuple[list, list[NoMatch]]:
    sites: list = []
    missed: list[NoMatch] = []
    matchers = {"rms_norm": (match_rms_norm, match_rms_norm_module), "layer_norm": (match_layer_norm,),
                "glu": (match_glu,), "rope": (match_rope,)}
    for node in list(gm.graph.nodes):
        if kind == "linear_cross_entropy":
            match = match_loss_head(gm, node)
            if isinstance(match, HeadSite) and match.reduction == 0:
                match = NoMatch(match.loss, "reduction='none' (per-token losses): left to remat's chunked head")
            results = [match]
        else:
            results = [matcher(gm, node) for matcher in matchers[kind]]
        for match in results:
            if isinstance(match, (Site, HeadSite)):
                sites.append(match)
            elif isinstance(match, NoMatch):
                missed.append(match)
    return sites, missed


def _new_node(graph: torch.fx.Graph, target: Any, args: tuple, kwargs: dict, like: torch.fx.Node) -> torch.fx.Node:
    node = graph.call_function(target, args, kwargs)
    node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace", "val", "tensor_meta")}
    return node


def _replace(graph: torch.fx.Graph, site: Site, options: dict) -> None:
    target = {"rms_norm": ops.rms_norm, "layer_norm": ops.layer_norm, "glu": ops.gated_activation}[site.kind]
    kwargs = {**site.kwargs, **options}
    with graph.inserting_before(site.output):
        call = _new_node(graph, target, site.args, kwargs, site.output)
    site.output.replace_all_uses_with(call)
    if site.output.op == "call_module":
        graph.erase_node(site.output)


def _replace_rope(graph: torch.fx.Graph, first: Site, second: Site | None, options: dict) -> None:
    order = {node: i for i, node in enumerate(graph.nodes)}
    later = first.output if second is None or order[first.output] > order[second.output] else second.output
    x, cos, sin, split = first.args
    with graph.inserting_before(later):
        call = _new_node(graph, ops.rotary_embedding, (x, second.args[0] if second else None, cos, sin, split),
                         dict(options), first.output)
        call.meta.pop("val", None)
        outputs = [(first, graph.call_function(operator.getitem, (call, 0)))]
        if second is not None:
            outputs.append((second, graph.call_function(operator.getitem, (call, 1))))
    for site, getter in outputs:
        getter.meta = {k: v for k, v in site.output.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
        site.output.replace_all_uses_with(getter)


def _replace_head(graph: torch.fx.Graph, site: HeadSite, options: dict, rows: int) -> None:
    with graph.inserting_before(site.loss):
        h = site.h
        for piece in site.slices:  # leading-dim slices of the logits → the same slices of h
            h = graph.call_function(piece.target, (h, *piece.args[1:]), dict(piece.kwargs))
            h.meta = dict(piece.meta)
        weight = graph.get_attr(site.weight) if isinstance(site.weight, str) else site.weight
        bias = graph.get_attr(site.bias) if isinstance(site.bias, str) else site.bias
        other_users = [u for u in site.linear.users if u not in site.chain and u is not site.loss]
        call = _new_node(graph, ops.linear_cross_entropy, (h, weight, bias, site.target),
                         {"ignore_index": site.ignore_index, "reduction": site.reduction, "upcast": site.upcast,
                          "want_logits": bool(other_users), **options, "rows": rows}, site.loss)
        call.meta.pop("val", None)
        loss = graph.call_function(operator.getitem, (call, 0))
        loss.meta = dict(site.loss.meta)
        logits = None
        if other_users:
            logits = graph.call_function(operator.getitem, (call, 1))
            logits.meta = dict(site.linear.meta)
    site.loss.replace_all_uses_with(loss)
    for user in other_users:
        user.replace_input_with(site.linear, logits)
    for dead in [site.loss, *reversed(site.chain), site.linear]:
        if not dead.users:
            graph.erase_node(dead)


def _resolved_backend(program: Program, backend: str) -> str:
    """What the calls run on the program's device: ``liger`` or ``reference``."""
    parameter = next(program.gm.parameters(), None)
    on_cuda = parameter is not None and parameter.is_cuda
    return "liger" if backend != "reference" and on_cuda and liger.available() else "reference"


def _low_precision(program: Program) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in program.gm.parameters())


def _describe(counts: Counter | dict) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)


def _summary(counts: dict[str, int], existing: Counter, backend: str) -> str:
    text = f"fused {_describe(counts) or 'nothing'} ({backend} kernels)"
    return text + (f"; already fused: {_describe(existing)}" if existing else "")
