"""``remat``'s loss head: a linear + cross-entropy computed chunk by chunk, never holding the full logits' loss state.

A language model's loss head is ``logits = linear(h, W, b)`` → (a float32 upcast) → ``view(-1, V)`` →
``cross_entropy(logits, target)``. With a 32k–256k vocabulary its saved tensors and the float32 copies
autograd keeps (the upcast logits, the log-softmax, the float32 logits gradient) are the largest activations
of the whole step: for batch 8 × 1024 tokens and V = 50304 each float32 copy is 1.6 GiB.

Rewrite rules (``chunk_loss_heads``):

1. Match ``cross_entropy`` (``aten.cross_entropy_loss`` or ``F.cross_entropy``; no class weights, no label
   smoothing) whose input reaches back, through single-use ``view``/``reshape``/``contiguous``/float
   ``to``/``slice``-on-a-leading-dim nodes only, to a linear (``aten.linear``, ``F.linear`` or an
   ``nn.Linear`` module) over the last dimension.
2. Replace the chain by one call of ``chunked_linear_cross_entropy(h, W, b, target, ...)`` (leading-dim
   slices move onto ``h``; they commute with the linear). Its forward runs the linear on ``rows`` rows at a
   time, keeps only each row's float32 log-sum-exp, and fills the logits output when the graph also returns
   the logits (they stay differentiable). Its backward recomputes each chunk's logits and back-propagates the
   softmax gradient through the same linear under the same autocast state as the forward, so only one
   chunk's logits exist at a time.
3. Exact to round-off: the loss and every gradient equal the unchunked head's up to summation order (fp32),
   and bf16 rounding of the per-chunk weight gradients under autocast. The extra cost is one LM-head matmul
   (the chunks' logits recomputed in backward).

Under ``torch.export`` (ONNX export, a re-capture) and ``torch.compile`` the call traces
``plain_linear_cross_entropy`` instead — the unchunked head, same arguments: ONNX Runtime builds its own
gradient graph from the plain ops, and Inductor fuses them (the chunk loop compiled ran slower: see the
README's ``remat`` table).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from effcompile.export.registry import serializable
from effcompile.patterns import HeadSite, find_loss_heads

aten = torch.ops.aten

CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk when rows are chosen automatically



def auto_rows(vocab: int) -> int:
    """Rows per chunk when not given: float32 logits of about ``CHUNK_BYTES`` (256 MiB), a multiple of 64."""
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return rows - rows % 64 if rows >= 64 else rows


def _loss_dtype(logits: torch.Tensor, upcast: torch.dtype | None) -> torch.dtype:
    """The dtype the original ``cross_entropy`` returned: the upcast's, float32 under autocast (cross-entropy
    is on autocast's float32 list), else the logits'."""
    if upcast is not None:
        return upcast
    if torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return logits.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(linear(x, W, b).float(), t)`` over row chunks; returns ``(loss, logits or None)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                ignore_index: int, reduction: int, upcast: torch.dtype | None, rows: int, want_logits: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else None
        ctx.autocast = (device_type, autocast, dtype)
        n = x.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        per_row = torch.empty(n, dtype=torch.float32, device=x.device)
        logits_out: torch.Tensor | None = None
        w, b = weight, bias
        if autocast:  # cast the weight once, not once per chunk (autocast caches casts only under grad mode)
            w = weight.to(dtype) if weight.is_floating_point() else weight
            b = bias.to(dtype) if bias is not None and bias.is_floating_point() else bias
        loss_dtype = None
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            logits = F.linear(x[start:stop], w, b)
            if loss_dtype is None:
                loss_dtype = _loss_dtype(logits, upcast)
            if want_logits:
                if logits_out is None:
                    logits_out = logits.new_empty((n, logits.shape[-1]))
                logits_out[start:stop] = logits
            z = logits.to(loss_dtype).float()  # the loss's rounding, then float32 arithmetic
            chunk_lse = torch.logsumexp(z, dim=-1)
            t = target[start:stop]
            valid = t != ignore_index
            picked = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
            lse[start:stop] = chunk_lse
            per_row[start:stop] = torch.where(valid, chunk_lse - picked, 0.0)
            del logits, z
        if loss_dtype is None:  # no rows
            loss_dtype = upcast or (torch.float32 if autocast else x.dtype)
        count = (target != ignore_index).sum()
        if reduction == 0:
            loss = per_row
        elif reduction == 2:
            loss = per_row.sum()
        else:
            loss = per_row.sum() / count
        ctx.save_for_backward(x, weight, bias, target, lse, count)
        ctx.options = (ignore_index, reduction, rows, loss_dtype)
        ctx.set_materialize_grads(False)
        return loss.to(loss_dtype), logits_out

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None, grad_logits: torch.Tensor | None) -> tuple[Any, ...]:
        x, weight, bias, target, lse, count = ctx.saved_tensors
        ignore_index, reduction, rows, loss_dtype = ctx.options
        device_type, autocast, dtype = ctx.autocast
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_loss is None and grad_logits is None) or not (need_x or need_w or need_b):
            return (None,) * 9
        # The forward's matmul dtypes, written out: autocast ran the linear on ``dtype`` copies of x and W, and
        # its casts hand the gradients back in x's and W's own dtypes.
        w = weight.to(dtype) if autocast and weight.is_floating_point() else weight
        b = bias.to(dtype) if autocast and bias is not None and bias.is_floating_point() else bias
        scale = None
        if grad_loss is not None:
            scale = grad_loss.float() / count if reduction == 1 else grad_loss.float()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, x.shape[0], rows):
                stop = min(start + rows, x.shape[0])
                chunk = x[start:stop].to(dtype) if autocast else x[start:stop]
                grad = None
                if scale is not None:
                    z = F.linear(chunk, w, b).to(loss_dtype).float()
                    t = target[start:stop]
                    valid = t != ignore_index
                    probs = torch.exp(z - lse[start:stop, None])
                    del z
                    probs.scatter_add_(1, torch.where(valid, t, 0).unsqueeze(1),
                                       torch.full((stop - start, 1), -1.0, device=probs.device))
                    row_scale = scale[start:stop] if reduction == 0 else scale
                    probs.mul_((valid.float() * row_scale).unsqueeze(1))
                    # back through the upcast: rounded to the loss dtype, then to the logits' dtype
                    grad = probs.to(loss_dtype).to(w.dtype)
                    del probs
                if grad_logits is not None:
                    extra = grad_logits[start:stop].to(w.dtype)
                    grad = extra if grad is None else grad + extra
                if need_x:
                    grad_x[start:stop] = (grad @ w).to(x.dtype)
                if need_w:
                    grad_w += (grad.t() @ chunk).to(weight.dtype)
                if need_b:
                    grad_b += grad.sum(0).to(bias.dtype)
                del grad, chunk
        return (grad_x, grad_w, grad_b) + (None,) * 6


@serializable
def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 target: torch.Tensor, ignore_index: int = -100, reduction: int = 1,
                                 upcast: torch.dtype | None = torch.float32, rows: int = 0,
                                 want_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cross_entropy(linear(h, weight, bias)[.to(upcast)].view(-1, V), target.view(-1))`` computed ``rows``
    rows at a time (0: about 256 MiB of float32 logits per chunk). ``reduction``: 0 none, 1 mean, 2 sum (aten's
    codes). Returns ``(loss, logits)``; ``logits`` (shape ``h.shape[:-1] + (V,)``) is None unless
    ``want_logits``. Gradients reach ``h``, ``weight`` and ``bias`` and equal the unchunked head's to round-off."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        # torch.export (ONNX export) records the plain head; torch.compile plans the head's memory itself
        # (its partitioner), and compiles the plain ops faster than the chunk loop
        return plain_linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, upcast, rows, want_logits)
    x = h.reshape(-1, h.shape[-1])
    t = target.reshape(-1)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"chunked cross-entropy: {t.shape[0]} targets for {x.shape[0]} rows of logits")
    vocab = weight.shape[0]
    loss, logits = _ChunkedLinearCrossEntropy.apply(x, weight, bias, t, ignore_index, reduction, upcast,
                                                    rows or auto_rows(vocab), want_logits)
    if logits is not None:
        logits = logits.view(*h.shape[:-1], vocab)
    return loss, logits


@serializable
def plain_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               target: torch.Tensor, ignore_index: int = -100, reduction: int = 1,
                               upcast: torch.dtype | None = torch.float32, rows: int = 0,
                               want_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unchunked head ``chunked_linear_cross_entropy`` stands for (same arguments; ``rows`` ignored):
    what ``torch.export`` records."""
    logits = F.linear(h, weight, bias)
    scores = logits.to(upcast) if upcast is not None else logits
    loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                           reduction={0: "none", 1: "mean", 2: "sum"}[reduction])
    return loss, (logits if want_logits else None)


def _fetch(graph: torch.fx.Graph, value: Any) -> Any:
    return graph.get_attr(value) if isinstance(value, str) else value


def chunk_loss_heads(gm: torch.fx.GraphModule, rows: int = 0) -> list[str]:
    """Replace every loss head ``find_loss_heads`` matches by one ``chunked_linear_cross_entropy`` call
    (``rows`` rows per chunk; 0 automatic). Other users of the logits (the model's ``logits`` output) read the
    logits the call fills. Returns the rewritten heads' linear names; recompiles ``gm`` when any changed."""
    done: list[str] = []
    graph = gm.graph
    for site in find_loss_heads(gm):
        with graph.inserting_before(site.loss):
            h = site.h
            for piece in site.slices:  # leading-dim slices of the logits → the same slices of h
                h = graph.call_function(piece.target, (h, *piece.args[1:]), dict(piece.kwargs))
                h.meta = dict(piece.meta)
            other_users = [u for u in site.linear.users if u not in site.chain and u is not site.loss]
            want_logits = bool(other_users)
            call = graph.call_function(chunked_linear_cross_entropy, (
                h, _fetch(graph, site.weight), _fetch(graph, site.bias), site.target),
                {"ignore_index": site.ignore_index, "reduction": site.reduction, "upcast": site.upcast,
                 "rows": rows, "want_logits": want_logits})
            call.meta = {k: v for k, v in site.loss.meta.items() if k in ("nn_module_stack", "stack_trace")}
            loss = graph.call_function(operator.getitem, (call, 0))
            loss.meta = dict(site.loss.meta)
            if want_logits:
                logits = graph.call_function(operator.getitem, (call, 1))
                logits.meta = dict(site.linear.meta)
        site.loss.replace_all_uses_with(loss)
        if want_logits:
            for user in other_users:
                user.replace_input_with(site.linear, logits)
        for dead in [site.loss, *reversed(site.chain), site.linear]:
            if not dead.users:
                graph.erase_node(dead)
        done.append(site.name)
    if done:
        graph.lint()
        gm.recompile()
    return done


def is_chunked_head(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls ``chunked_linear_cross_entropy``."""
    return node.op == "call_function" and node.target is chunked_linear_cross_entropy


def head_names(sites: Sequence[HeadSite]) -> list[str]:
    """The module paths (or node names) of matched heads, for reports."""
    return [site.name for site in sites]
