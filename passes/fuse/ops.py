"""The fused ops ``fuse`` puts in the graph: one Python function per fusion, the target of a call_function node.

Each call takes one of three roads:

1. ``torch.export`` (ONNX export, a re-capture): the *plain* ops (``reference.*_plain``), which exporters and
   ONNX Runtime's gradient builder know.
2. ``torch.compile``: the loss head is a ``torch.library`` custom op (``effcompile::linear_cross_entropy``,
   with a fake implementation and ``register_autograd``): dynamo sees one opaque op, so the logits are
   never materialised (Liger's own autograd Function fails under dynamo in torch 2.11). RMSNorm and the
   gated activation are custom ops too when the pass's ``compiled`` option is ``kernels``; by default
   (``inductor``) they trace their plain ops, which Inductor fuses with their neighbours itself.
3. eager: an ``autograd.Function`` whose forward runs the backend's kernel and saves what the kernel
   saves (a custom op costs ~4× an autograd Function's Python overhead per call).

The backend (``liger``/``reference``/``auto``) is an argument of the call: ``auto`` and ``liger`` run
Liger-Kernel's kernel on CUDA tensors when it is installed and covers the variant, else the reference.
"""

from __future__ import annotations

from typing import Any

import torch

from effcompile.export.registry import serializable

from . import liger, reference

_DTYPES = {"": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def kernels(backend: str, *tensors: torch.Tensor | None) -> Any:
    """The kernel module a call uses first: ``liger`` for CUDA tensors when the backend allows it and the
    package imports, else ``reference``. (A liger function returning None falls back to the reference.)"""
    if backend != "reference" and any(t is not None and t.is_cuda for t in tensors) and liger.available():
        return liger
    return reference


def _call(backend: str, name: str, tensors: tuple, *args: Any) -> Any:
    module = kernels(backend, *tensors)
    if module is liger:
        result = getattr(liger, name)(*args)
        if result is not None:
            return result
    return getattr(reference, name)(*args)


def _plain_road(compiled: str) -> bool:
    return torch.compiler.is_exporting() or (torch.compiler.is_compiling() and compiled != "kernels")


# --------------------------------------------------------------------------------------------- RMSNorm

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, eps, offset, upcast, mid, weight_float, out, backend):
        y, rstd = _call(backend, "rms_norm_forward", (x, weight), x, weight, eps, offset, upcast, mid, weight_float, out)
        ctx.save_for_backward(x, weight, rstd)
        ctx.options = (offset, upcast, mid, weight_float, backend)
        return y

    @staticmethod
    def backward(ctx: Any, grad):
        x, weight, rstd = ctx.saved_tensors
        offset, upcast, mid, weight_float, backend = ctx.options
        need_w = weight is not None and ctx.needs_input_grad[1]
        grad_x, grad_w = _call(backend, "rms_norm_backward", (x, weight), grad, x, weight, rstd, offset, upcast, mid,
                               weight_float, need_w)
        return grad_x, grad_w, None, None, None, None, None, None, None


@torch.library.custom_op("effcompile::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, upcast: bool, mid: str,
                 weight_float: bool, out: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = _call(backend, "rms_norm_forward", (x, weight), x, weight, eps, offset, upcast, _DTYPES[mid],
                    weight_float, _DTYPES[out])
    return y.clone() if y is x else y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, offset, upcast, mid, weight_float, out, backend):
    return reference.rms_norm_forward(x, weight, eps, offset, upcast, _DTYPES[mid], weight_float, _DTYPES[out])


@torch.library.custom_op("effcompile::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                          offset: float, upcast: bool, mid: str, weight_float: bool, need_weight: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_w = _call(backend, "rms_norm_backward", (x, weight), grad, x, weight, rstd, offset, upcast,
                           _DTYPES[mid], weight_float, need_weight)
    return grad_x, grad_w if grad_w is not None else x.new_empty(0)


@_rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd, offset, upcast, mid, weight_float, need_weight, backend):
    return torch.empty_like(x), (torch.empty_like(weight) if need_weight and weight is not None else x.new_empty(0))


def _rms_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    x, weight, _, offset, upcast, mid, weight_float, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.options = (offset, upcast, mid, weight_float, backend)


def _rms_backward(ctx: Any, grad, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    offset, upcast, mid, weight_float, backend = ctx.options
    need_w = weight is not None and ctx.needs_input_grad[1]
    grad_x, grad_w = _rms_norm_backward_op(grad, x, weight, rstd, offset, upcast, mid, weight_float, need_w, backend)
    return grad_x, (grad_w if need_w else None), None, None, None, None, None, None, None


_rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


@serializable(name="fuse.rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0, upcast: bool = True,
             mid_dtype: torch.dtype | None = None, weight_float: bool = False, out_dtype: torch.dtype | None = None,
             backend: str = "auto", compiled: str = "inductor") -> torch.Tensor:
    """Fused RMSNorm over the last dimension (``reference.rms_norm_forward`` says what it computes);
    saves only ``x`` and the float32 ``rstd`` for backward."""
    if _plain_road(compiled):
        return reference.rms_norm_plain(x, weight, eps, offset, upcast, mid_dtype, weight_float, out_dtype)
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, eps, offset, upcast, _dtype_name(mid_dtype), weight_float,
                            _dtype_name(out_dtype), backend)[0]
    return _RMSNorm.apply(x, weight, eps, offset, upcast, mid_dtype, weight_float, out_dtype, backend)


rms_norm.effcompile_op_class = "norm"


# ------------------------------------------------------------------------------------------- LayerNorm

class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, eps, backend):
        y, mean, rstd = _call(backend, "layer_norm_forward", (x, weight, bias), x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx: Any, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        grad_x, grad_w, grad_b = _call(ctx.backend, "layer_norm_backward", (x, weight, bias), grad, x, weight, bias,
                                       mean, rstd, mask)
        return grad_x, grad_w, grad_b, None, None


@serializable(name="fuse.layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               backend: str = "auto", compiled: str = "inductor") -> torch.Tensor:
    """Fused LayerNorm over the last dimension; under autocast it runs in float32, as ``layer_norm`` does."""
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias = (t.float() if t is not None and t.is_floating_point() else t for t in (x, weight, bias))
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    with torch.autocast(x.device.type, enabled=False):
        return _LayerNorm.apply(x, weight, bias, eps, backend)


layer_norm.effcompile_op_class = "norm"


# ------------------------------------------------------------------------------------ gated activation

class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a, b, kind, backend):
        ctx.save_for_backward(a, b)
        ctx.options = (kind, backend)
        return _call(backend, "glu_forward", (a, b), a, b, kind)

    @staticmethod
    def backward(ctx: Any, grad):
        a, b = ctx.saved_tensors
        kind, backend = ctx.options
        grad_a, grad_b = _call(backend, "glu_backward", (a, b), grad, a, b, kind, *ctx.needs_input_grad[:2])
        return grad_a, grad_b, None, None


@torch.library.custom_op("effcompile::gated_activation", mutates_args=())
def _glu_op(a: torch.Tensor, b: torch.Tensor, kind: str, backend: str) -> torch.Tensor:
    return _call(backend, "glu_forward", (a, b), a, b, kind)


@_glu_op.register_fake
def _(a, b, kind, backend):
    return reference.glu_forward(a, b, kind)


@torch.library.custom_op("effcompile::gated_activation_backward", mutates_args=())
def _glu_backward_op(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _call(backend, "glu_backward", (a, b), grad, a, b, kind, True, True)


@_glu_backward_op.register_fake
def _(grad, a, b, kind, backend):
    return torch.empty_like(a), torch.empty_like(b)


def _glu_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.options = inputs[2:]


def _glu_backward(ctx: Any, grad):
    a, b = ctx.saved_tensors
    grad_a, grad_b = _glu_backward_op(grad, a, b, *ctx.options)
    return grad_a, grad_b, None, None


_glu_op.register_autograd(_glu_backward, setup_context=_glu_setup)


@serializable(name="fuse.gated_activation")
def gated_activation(a: torch.Tensor, b: torch.Tensor, kind: str, backend: str = "auto",
                     compiled: str = "inductor") -> torch.Tensor:
    """``act(a) * b`` (SwiGLU: ``silu``; GeGLU: ``gelu_tanh`` / ``gelu``), saving only ``a`` and ``b``."""
    if _plain_road(compiled):
        return reference.glu_forward(a, b, kind)
    if torch.compiler.is_compiling():
        return _glu_op(a, b, kind, backend)
    return _GLU.apply(a, b, kind, backend)


gated_activation.effcompile_op_class = "elementwise"


# ------------------------------------------------------------------------------------ rotary embedding

class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, cos, sin, backend):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, q.dtype, None if k is None else k.shape, None if k is None else k.dtype)
        ctx.backend = backend
        if k is not None and kernels(backend, q, k) is liger:
            result = liger.rope_pair_forward(q, k, cos, sin)
            if result is not None:
                return result
        q_out = reference.rope_forward(q, cos, sin)
        return (q_out, None) if k is None else (q_out, reference.rope_forward(k, cos, sin))

    @staticmethod
    def backward(ctx: Any, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        q_shape, q_dtype, k_shape, k_dtype = ctx.shapes
        if grad_k is not None and grad_q is not None and kernels(ctx.backend, cos) is liger \
                and grad_q.shape == q_shape and grad_k.shape == k_shape:
            result = liger.rope_pair_backward(grad_q.to(q_dtype), grad_k.to(k_dtype), cos, sin)
            if result is not None:
                return result[0], result[1], None, None, None
        dq = reference.rope_backward(grad_q, q_shape, q_dtype, cos, sin) if grad_q is not None else None
        dk = reference.rope_backward(grad_k, k_shape, k_dtype, cos, sin) if grad_k is not None else None
        return dq, dk, None, None, None


def _rotate_plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split: Any) -> torch.Tensor:
    return x * cos + torch.cat((-x[..., split:], x[..., :split]), dim=-1) * sin


@serializable(name="fuse.rotary_embedding")
def rotary_embedding(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, split: Any,
                     backend: str = "auto", compiled: str = "inductor") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``t·cos + cat(-t[..., split:], t[..., :split])·sin`` for ``t`` = ``q`` and (if given) ``k``, one kernel for
    both; saves only ``cos`` and ``sin``. Returns ``(q_out, k_out or None)``. The fused kernel runs when
    ``split`` is half the last dimension (``rotate_half``) and ``cos``/``sin`` need no gradient; otherwise, and
    under export or compile, the plain ops."""
    halves = all(t is None or split == t.shape[-1] // 2 and t.shape[-1] % 2 == 0 for t in (q, k))
    if torch.compiler.is_exporting() or torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad \
            or not halves:
        return _rotate_plain(q, cos, sin, split), (None if k is None else _rotate_plain(k, cos, sin, split))
    return _Rope.apply(q, k, cos, sin, backend)


rotary_embedding.effcompile_op_class = "elementwise"


# ------------------------------------------------------------------------------- linear + cross-entropy

def _loss_dtype(logits_dtype: torch.dtype, upcast: torch.dtype | None) -> torch.dtype:
    """The cross-entropy's dtype: the upcast's, else float32 for low-precision logits (what autocast and
    ``amp`` both do to ``cross_entropy``), else the logits'."""
    if upcast is not None:
        return upcast
    return torch.float32 if logits_dtype in (torch.float16, torch.bfloat16) else logits_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, target, ignore_index, reduction, loss_dtype, want_logits, backend, rows,
                need):
        loss, grad_x, grad_w, grad_b, logits = _call(
            backend, "linear_cross_entropy_forward", (x, weight, bias), x, weight, bias, target, ignore_index,
            reduction, loss_dtype, need, want_logits, rows)
        ctx.save_for_backward(grad_x, grad_w, grad_b, x if want_logits else None, weight if want_logits else None)
        ctx.set_materialize_grads(False)
        return loss, logits

    @staticmethod
    def backward(ctx: Any, grad_loss, grad_logits):
        grad_x, grad_w, grad_b, x, weight = ctx.saved_tensors
        scale = grad_loss.float() if grad_loss is not None else None
        outs = []
        for grad in (grad_x, grad_w, grad_b):
            outs.append(None if grad is None or scale is None else (grad.float() * scale).to(grad.dtype))
        if grad_logits is not None:  # the logits output was used differentiably: back through the linear too
            extra_x = grad_logits.to(weight.dtype) @ weight
            outs[0] = extra_x if outs[0] is None else outs[0] + extra_x.to(outs[0].dtype)
            extra_w = (grad_logits.to(x.dtype).t() @ x).to(weight.dtype)
            outs[1] = extra_w if outs[1] is None else outs[1] + extra_w
            if ctx.needs_input_grad[2]:
                extra_b = grad_logits.sum(0)
                outs[2] = extra_b if outs[2] is None else outs[2] + extra_b.to(outs[2].dtype)
        return outs[0], outs[1], outs[2], None, None, None, None, None, None, None, None


@torch.library.custom_op("effcompile::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                             ignore_index: int, reduction: int, loss_dtype: str, need_x: bool, need_w: bool,
                             need_b: bool, backend: str, rows: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad_x, grad_w, grad_b, _ = _call(
        backend, "linear_cross_entropy_forward", (x, weight, bias), x, weight, bias, target, ignore_index, reduction,
        _DTYPES[loss_dtype], (need_x, need_w, need_b and bias is not None), False, rows)
    empty = x.new_empty(0)
    return loss, (grad_x if grad_x is not None else empty), (grad_w if grad_w is not None else empty), \
        (grad_b if grad_b is not None else empty)


@_linear_cross_entropy_op.register_fake
def _(x, weight, bias, target, ignore_index, reduction, loss_dtype, need_x, need_w, need_b, backend, rows):
    empty = x.new_empty(0)
    return (x.new_empty((), dtype=_DTYPES[loss_dtype]), torch.empty_like(x) if need_x else empty,
            torch.empty_like(weight) if need_w else empty,
            torch.empty_like(bias) if need_b and bias is not None else empty)


def _lce_setup(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.present = tuple(bool(flag) for flag in inputs[7:10])


def _lce_backward(ctx: Any, grad_loss, *_unused):
    grads = []
    for grad, present in zip(ctx.saved_tensors, ctx.present):
        grads.append((grad.float() * grad_loss.float()).to(grad.dtype) if present and grad.numel() else None)
    return (*grads, None, None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup)


@serializable(name="fuse.linear_cross_entropy")
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         ignore_index: int = -100, reduction: int = 1, upcast: torch.dtype | None = None,
                         want_logits: bool = False, backend: str = "auto", compiled: str = "inductor",
                         rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cross_entropy(linear(h, W, b)[.to(upcast)].view(-1, V), target.view(-1))`` (``reduction`` 1 mean, 2 sum)
    without ever holding every row's logits: the input gradients are computed in the forward, chunk by
    chunk (``rows`` per chunk, 0 automatic), and backward only scales them. Under autocast the linear runs
    in autocast's dtype, the loss in float32. Returns ``(loss, logits)``; ``logits`` (``h.shape[:-1] + (V,)``,
    still differentiable) is None unless ``want_logits``."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        h, weight, bias = (t.to(low) if t is not None and t.is_floating_point() else t for t in (h, weight, bias))
    if torch.compiler.is_exporting() or (torch.compiler.is_compiling() and want_logits):
        loss, logits = reference.linear_cross_entropy_plain(h, weight, bias, target.reshape(-1), ignore_index,
                                                            reduction, upcast)
        return loss, (logits if want_logits else None)
    x = h.reshape(-1, h.shape[-1])
    t = target.reshape(-1)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"fused cross-entropy: {t.shape[0]} targets for {x.shape[0]} rows of logits")
    loss_dtype = _loss_dtype(x.dtype if x.dtype.itemsize >= weight.dtype.itemsize else weight.dtype, upcast)
    grad_mode = torch.is_grad_enabled()
    need = (grad_mode and x.requires_grad, grad_mode and weight.requires_grad,
            grad_mode and bias is not None and bias.requires_grad)
    with torch.autocast(device, enabled=False):
        if torch.compiler.is_compiling():
            return _linear_cross_entropy_op(x, weight, bias, t, ignore_index, reduction, _dtype_name(loss_dtype),
                                            *need, backend, rows)[0], None
        loss, logits = _LinearCrossEntropy.apply(x, weight, bias, t, ignore_index, reduction, loss_dtype, want_logits,
                                                 backend, rows, need)
    if logits is not None:
        logits = logits.view(*h.shape[:-1], weight.shape[0])
    return loss, logits


linear_cross_entropy.effcompile_op_class = "loss_head"
linear_cross_entropy.low_precision_ok = True  # amp: cast its inputs to the low dtype; the loss stays float32
