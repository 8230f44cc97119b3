"""Liger-Kernel (``pip install effcompile[fuse]``, liger-kernel 0.8.5) behind ``fuse``'s kernel interface.

Each function takes the arguments of its ``reference.py`` counterpart and returns the same values, or None
when Liger has no kernel for that variant (a dtype mix, an erf GELU, a layout) — the caller then runs the
reference kernel, so a fusion never silently computes something else. The kernel-level functions
(``rms_norm_forward`` …) are used rather than Liger's autograd Functions so that one forward/backward pair
serves both eager autograd and the ``torch.library`` custom ops ``torch.compile`` sees. Liger's kernels
write some results into their inputs' storage (RoPE rotates in place, SwiGLU's backward overwrites ``a``
and ``b``), so those inputs are cloned first: the fused ops must not mutate values the graph may read.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

_LOW = (torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether liger-kernel (and so Triton) can be imported here."""
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def _ops(name: str) -> Any:
    return importlib.import_module(f"liger_kernel.ops.{name}")


def _cuda(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.is_cuda for t in tensors)


def rms_norm_forward(x, weight, eps, offset, upcast, mid_dtype, weight_float, out_dtype):
    """Liger's RMSNorm: casting mode ``llama`` (float32 ``rstd``, the normalised row cast back to ``x``'s
    dtype before the weight) or ``gemma`` (all float32, cast at the end); output in ``x``'s dtype."""
    mode = _rms_mode(x, weight, upcast, mid_dtype, weight_float, out_dtype)
    if mode is None:
        return None
    y, _, rstd, _, _, _ = _ops("rms_norm").rms_norm_forward(x.contiguous(), weight, eps, float(offset), mode, None)
    return y, rstd.view(*x.shape[:-1], 1)


def _rms_mode(x, weight, upcast, mid_dtype, weight_float, out_dtype) -> str | None:
    """Liger's casting mode computing what the matched subgraph computes (output in ``x``'s dtype), or None."""
    if not _cuda(x, weight) or x.dtype not in (torch.float32, *_LOW) or (weight is not None and weight.dim() != 1):
        return None
    if x.dtype == torch.float32:
        fp32 = (weight is None or weight.dtype == torch.float32) and mid_dtype in (None, torch.float32)
        return "llama" if fp32 and out_dtype in (None, torch.float32) else None
    if mid_dtype == x.dtype and out_dtype in (None, x.dtype) and \
            (weight is None or (weight.dtype == x.dtype and not weight_float)):
        return "llama"  # float32 rstd, the normalised row cast back to x's dtype, then the weight
    if mid_dtype in (None, torch.float32) and out_dtype == x.dtype and \
            (weight is None or weight_float or weight.dtype == torch.float32):
        return "gemma"  # every step in float32, one cast at the end
    return None


def rms_norm_backward(grad, x, weight, rstd, offset, upcast, mid_dtype, weight_float, need_weight):
    """Liger's RMSNorm backward (``dx``, ``dweight``), or None for a variant it does not cover."""
    mode = _rms_mode(x, weight, upcast, mid_dtype, weight_float, x.dtype)
    if mode is None:
        return None
    module = _ops("rms_norm")
    block, warps = _ops("utils").calculate_settings(x.shape[-1])
    code = module._str_to_casting_mode[mode]
    grad_x, grad_w = module.rms_norm_backward(grad.to(x.dtype).contiguous().clone(), x.contiguous(), weight,
                                              rstd.reshape(-1), float(offset), code, block, warps, True, None,
                                              need_weight)
    return grad_x.view(x.shape), (grad_w.to(weight.dtype) if grad_w is not None and need_weight else None)


def layer_norm_forward(x, weight, bias, eps):
    """Liger's LayerNorm ``(y, mean, rstd)`` for one dtype throughout, else None."""
    if not _cuda(x, weight, bias) or any(t is not None and t.dtype != x.dtype for t in (weight, bias)) \
            or weight is None or bias is None:
        return None
    y, _, mean, rstd, _, _ = _ops("layer_norm").layer_norm_forward(x.contiguous(), weight, bias, eps)
    return y, mean.view(*x.shape[:-1], 1), rstd.view(*x.shape[:-1], 1)


def layer_norm_backward(grad, x, weight, bias, mean, rstd, mask):
    """Liger's LayerNorm backward, else None."""
    if not _cuda(x, weight, bias) or weight is None or bias is None or weight.dtype != x.dtype:
        return None
    grad_x, grad_w, grad_b = _ops("layer_norm").layer_norm_backward(
        grad.to(x.dtype).contiguous(), x.contiguous(), weight, bias, mean.reshape(-1), rstd.reshape(-1),
        mask[1], mask[2])
    return grad_x.view(x.shape), grad_w if mask[1] else None, grad_b if mask[2] else None


def glu_forward(a, b, kind):
    """Liger's SwiGLU (``silu``) or GeGLU (``gelu_tanh``; Liger has no erf GELU kernel), else None."""
    if kind == "gelu" or not _cuda(a, b) or a.dtype != b.dtype or a.shape != b.shape:
        return None
    if kind == "silu":
        return _ops("swiglu").swiglu_forward(a.contiguous(), b.contiguous())[2]
    return _ops("geglu").geglu_forward(a.contiguous(), b.contiguous())[2]


def glu_backward(grad, a, b, kind, need_a=True, need_b=True):
    """Liger's SwiGLU/GeGLU backward on copies of ``a`` and ``b`` (its kernel overwrites them), else None."""
    if kind == "gelu" or not _cuda(a, b) or a.dtype != b.dtype or a.shape != b.shape:
        return None
    backward = _ops("swiglu").swiglu_backward if kind == "silu" else _ops("geglu").geglu_backward
    grad_a, grad_b = backward(a.clone(memory_format=torch.contiguous_format),
                              b.clone(memory_format=torch.contiguous_format), grad.to(a.dtype).contiguous())
    return (grad_a if need_a else None), (grad_b if need_b else None)


def _rope_layout(q, k, cos) -> bool:
    return (_cuda(q, k, cos) and q.dim() == 4 and k.dim() == 4 and cos.dim() == 4 and cos.shape[1] == 1
            and q.dtype == k.dtype == cos.dtype and cos.shape[-2] == q.shape[-2] == k.shape[-2]
            and cos.shape[-1] == q.shape[-1] == k.shape[-1] and cos.shape[0] in (1, q.shape[0]))


def rope_pair_forward(q, k, cos, sin):
    """Liger's RoPE on ``q`` ``[B, H, S, D]`` and ``k`` ``[B, Hkv, S, D]`` with ``cos``/``sin`` ``[B|1, 1, S, D]``
    (one kernel for both), on copies (the kernel rotates in place); else None."""
    if not _rope_layout(q, k, cos) or sin.shape != cos.shape:
        return None
    q_out, k_out, _, _ = _ops("rope").rope_forward(q.clone(), k.clone(), cos, sin)
    return q_out, k_out


def rope_pair_backward(grad_q, grad_k, cos, sin):
    """Liger's RoPE backward (the inverse rotation), on copies of the gradients; else None."""
    if not _rope_layout(grad_q, grad_k, cos.to(grad_q.dtype)) or sin.shape != cos.shape:
        return None
    grad_q, grad_k = _ops("rope").rope_backward(grad_q.clone(), grad_k.clone(), cos.to(grad_q.dtype),
                                                sin.to(grad_q.dtype))
    return grad_q, grad_k


def linear_cross_entropy_forward(x, weight, bias, target, ignore_index, reduction, loss_dtype, need, want_logits,
                                 rows=0):
    """Liger's fused linear + cross-entropy (logits never whole; gradients computed in the forward), for
    mean/sum reductions without the logits output; else None."""
    if want_logits or reduction not in (1, 2) or not _cuda(x, weight, bias) or loss_dtype != torch.float32:
        return None
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    module = _ops("fused_linear_cross_entropy")
    result = module.fused_linear_cross_entropy_forward(
        x.contiguous(), weight, target.contiguous(), bias=bias, ignore_index=ignore_index,
        reduction={1: "mean", 2: "sum"}[reduction], compute_gradients=bool(need[0] or need[1] or need[2]),
        weight_requires_grad=bool(need[1]))
    loss, grad_x, grad_w, grad_b = result[0], result[-3], result[-2], result[-1]
    return (loss.float(), grad_x if need[0] else None, grad_w if need[1] else None,
            grad_b if need[2] else None, None)
