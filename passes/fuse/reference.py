"""Exact PyTorch kernels for ``fuse``: each fusion's forward (returning what the fused kernel saves) and
backward (from those saved tensors only), plus its *plain* form — the unfused ops, which ``torch.export``
records (ONNX export) and ``torch.compile`` may trace.

The forwards repeat the matched subgraph's ops in its order and dtypes, so at float32 outputs equal the
original's bit for bit and gradients to float32 round-off (a backward written out in closed form sums in
another order than autograd's chain of ops). What each saves is what Liger-Kernel's kernel saves:

* RMSNorm: ``x`` and the float32 ``rstd`` (one value per row) — not a float32 copy of ``x``, nor the
  normalised ``x``; backward recomputes them.
* LayerNorm: ``x``, ``mean``, ``rstd`` (``aten.native_layer_norm``'s own saved set; bitwise autograd's).
* gated activation (SwiGLU / GeGLU): the two inputs ``a``, ``b`` — not ``act(a)``.
* rotary embedding: ``cos`` and ``sin`` only (the rotation's backward is the inverse rotation).
* linear + cross-entropy: the input gradients, computed in the forward chunk by chunk, so the logits of
  all rows never exist at once (``chunk_rows``); backward only scales them by the loss gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten
CHUNK_BYTES = 256 * 2**20  # float32 logits per loss-head chunk


# --------------------------------------------------------------------------------------------- RMSNorm

def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, upcast: bool,
                     mid_dtype: torch.dtype | None, weight_float: bool, out_dtype: torch.dtype | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = [offset +] w · (x̂ · rsqrt(mean(x̂², -1) + eps))[.to(mid_dtype)]`` then ``[.to(out_dtype)]``, with
    ``x̂ = x.float()`` when ``upcast``. The variance is always computed in float32 (autocast runs ``pow`` and
    ``rsqrt`` there too). Returns ``(y, rstd)``, ``rstd`` float32 of shape ``x.shape[:-1] + (1,)``."""
    xf = x.float() if upcast else x
    rstd = torch.rsqrt(xf.float().pow(2).mean(-1, keepdim=True) + eps)
    y = xf * rstd
    if mid_dtype is not None:
        y = y.to(mid_dtype)
    if weight is not None:
        w = weight.float() if weight_float else weight
        y = (offset + w if offset else w) * y
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y, rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                      offset: float, upcast: bool, mid_dtype: torch.dtype | None, weight_float: bool,
                      need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, dweight)`` of ``rms_norm_forward`` from ``x``, ``weight`` and ``rstd`` alone."""
    xf = x.float() if upcast else x
    normed = xf * rstd
    scaled = normed.to(mid_dtype) if mid_dtype is not None else normed
    grad_weight = None
    if weight is not None:
        w = weight.float() if weight_float else weight
        w = offset + w if offset else w
        product_dtype = torch.result_type(w, scaled)
        grad = grad.to(product_dtype)
        if need_weight:
            reduce = tuple(range(grad.dim() - 1))
            grad_weight = (grad * scaled).sum(reduce).to(weight.dtype)
        grad = grad * w
    grad_normed = grad.to(scaled.dtype).to(normed.dtype).float()
    normed32 = normed.float()
    grad_x = rstd * (grad_normed - normed32 * (grad_normed * normed32).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, upcast: bool,
                   mid_dtype: torch.dtype | None, weight_float: bool, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The unfused RMSNorm (autograd differentiates it): what export records."""
    return rms_norm_forward(x, weight, eps, offset, upcast, mid_dtype, weight_float, out_dtype)[0]


# ------------------------------------------------------------------------------------------- LayerNorm

def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension: ``(y, mean, rstd)`` as ``aten.native_layer_norm`` returns them."""
    return aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)


def layer_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        mean: torch.Tensor, rstd: torch.Tensor, mask: tuple[bool, bool, bool]
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dbias)`` — autograd's own LayerNorm backward (``mask``: which are needed)."""
    return aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd, weight, bias, list(mask))


# ------------------------------------------------------------------------------------ gated activation

def _activation(a: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(a)
    return F.gelu(a, approximate="tanh" if kind == "gelu_tanh" else "none")


def glu_forward(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """``act(a) * b`` with ``act`` = ``silu``, ``gelu_tanh`` or ``gelu`` (erf)."""
    return _activation(a, kind) * b


def glu_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str, need_a: bool = True,
                 need_b: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(da, db)`` of ``glu_forward`` from ``a`` and ``b`` (``act(a)`` recomputed), with autograd's formulas
    (``aten.silu_backward`` / ``aten.gelu_backward``) and dtype handling."""
    activated = _activation(a, kind)
    grad_a = grad_b = None
    if need_b:
        grad_b = (grad * activated).to(b.dtype)
    if need_a:
        grad_act = (grad * b).to(activated.dtype)
        if kind == "silu":
            grad_a = aten.silu_backward(grad_act, a)
        else:
            grad_a = aten.gelu_backward(grad_act, a, approximate="tanh" if kind == "gelu_tanh" else "none")
    return grad_a, grad_b


# ------------------------------------------------------------------------------------ rotary embedding

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x₂, x₁)`` over the halves of the last dimension (Llama's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (``cos``/``sin`` broadcast against ``x``)."""
    return x * cos + rotate_half(x) * sin


def rope_backward(grad: torch.Tensor, x_shape: torch.Size, x_dtype: torch.dtype, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """``dx`` of ``rope_forward`` from ``cos`` and ``sin``: ``g·cos + rotate_halfᵀ(g·sin)``, where
    ``rotate_halfᵀ(y) = cat(y₂, -y₁)``; summed to ``x_shape`` where ``cos``/``sin`` broadcast ``x``."""
    scaled = grad * sin
    half = scaled.shape[-1] // 2
    grad_x = grad * cos + torch.cat((scaled[..., half:], -scaled[..., :half]), dim=-1)
    if grad_x.shape != x_shape:
        grad_x = grad_x.sum_to_size(x_shape)
    return grad_x.to(x_dtype)


# ------------------------------------------------------------------------------- linear + cross-entropy

def chunk_rows(vocab: int, rows: int = 0) -> int:
    """Rows per loss-head chunk: ``rows`` if given, else float32 logits of about ``CHUNK_BYTES``."""
    if rows > 0:
        return rows
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def linear_cross_entropy_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 target: torch.Tensor, ignore_index: int, reduction: int, loss_dtype: torch.dtype,
                                 need: tuple[bool, bool, bool], want_logits: bool, rows: int = 0
                                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                            torch.Tensor | None, torch.Tensor | None]:
    """``cross_entropy(linear(x, W, b).to(loss_dtype).float(), target)`` (``reduction`` 1 mean, 2 sum) over row
    chunks of the 2-D ``x``, in the dtypes the arguments have (cast them first for mixed precision).

    Returns ``(loss, grad_x, grad_weight, grad_bias, logits)``: the loss (``loss_dtype``), the gradients of a
    unit loss gradient for the inputs flagged in ``need`` (else None) and, when ``want_logits``, the logits
    (``x``'s compute dtype). Only one chunk's logits exist at a time unless ``want_logits``."""
    n, vocab = x.shape[0], weight.shape[0]
    rows = chunk_rows(vocab, rows)
    valid_all = target != ignore_index
    count = valid_all.sum()
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need[0] else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if need[2] and bias is not None else None
    logits_out = None
    scale = 1.0 / count.clamp(min=1).float() if reduction == 1 else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        chunk = x[start:stop]
        logits = F.linear(chunk, weight, bias)
        if want_logits:
            if logits_out is None:
                logits_out = logits.new_empty((n, vocab))
            logits_out[start:stop] = logits
        z = logits.to(loss_dtype).float()
        del logits
        t = target[start:stop]
        valid = valid_all[start:stop]
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
        total = total + torch.where(valid, lse - picked, 0.0).sum()
        if any(need):
            probs = torch.exp(z.sub_(lse[:, None]))
            del z
            probs.scatter_add_(1, torch.where(valid, t, 0).unsqueeze(1),
                               torch.full((stop - start, 1), -1.0, device=probs.device))
            probs.mul_(valid.float().unsqueeze(1) if scale is None else (valid.float() * scale).unsqueeze(1))
            grad = probs.to(loss_dtype).to(weight.dtype)  # back through the loss's and the logits' dtypes
            del probs
            if need[0]:
                grad_x[start:stop] = grad @ weight
            if grad_w is not None:
                grad_w += (grad.t() @ chunk).float()
            if grad_b is not None:
                grad_b += grad.sum(0).float()
            del grad
    loss = total / count.float() if reduction == 1 else total
    return (loss.to(loss_dtype), grad_x, grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None, logits_out)


def linear_cross_entropy_plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                               ignore_index: int, reduction: int, loss_dtype: torch.dtype | None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused head (autograd differentiates it): ``(loss, logits)``; what export records."""
    logits = F.linear(x, weight, bias)
    scores = logits.to(loss_dtype) if loss_dtype is not None else logits
    scores = scores.reshape(-1, scores.shape[-1])
    loss = F.cross_entropy(scores.float() if scores.dtype != torch.float64 else scores, target.reshape(-1),
                           ignore_index=ignore_index, reduction={1: "mean", 2: "sum"}[reduction])
    return loss.to(loss_dtype or loss.dtype), logits
