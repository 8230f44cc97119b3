"""The precision policy of the ``amp`` pass: which ops run in low precision, which stay in float32.

The lists follow ``torch.autocast``'s CUDA policy (``aten/src/ATen/autocast_mode.cpp``) so that a
rewritten graph computes what the same model computes under autocast:

* *low*: matmul-like ops and attention kernels (linear, addmm, mm, bmm, matmul, baddbmm, conv,
  scaled_dot_product_attention, einsum) — every floating input is cast to the low dtype;
* *keep_fp32* classes: their low-precision inputs are cast back to float32 (``softmax``, ``norm``,
  ``reduction``, ``loss``, ``exp_log_pow``, ``cumulative``, ``fft``);
* *promote*: ops that need one dtype for all their tensor inputs (``cat``, ``addcmul``,
  ``index_put``...) — mixed inputs are cast to the widest;
* everything else runs in the dtype of its inputs, with PyTorch's type promotion (a bfloat16 matmul
  output added to a float32 residual gives float32, as under autocast).

Op names are matched by name whichever graph kind holds them: ``aten.softmax.int`` (export),
``torch.softmax`` / ``F.softmax`` (call_function) and ``x.softmax`` (call_method) are all ``softmax``.
"""

from __future__ import annotations

import torch
import torch.fx

from effcompile.graph import op_name

LOW_PRECISION_OPS = frozenset({
    "linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "addbmm", "addmv", "mv", "einsum", "chain_matmul",
    "multi_dot", "linalg_multi_dot", "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
})

KEEP_FP32_CLASSES: dict[str, frozenset[str]] = {
    "softmax": frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax", "softmin"}),
    "norm": frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
                       "native_group_norm", "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                       "_native_batch_norm_legit_no_training", "instance_norm", "norm", "frobenius_norm",
                       "nuclear_norm", "linalg_vector_norm", "linalg_matrix_norm", "linalg_norm", "renorm",
                       "normalize"}),
    "reduction": frozenset({"sum", "nansum", "prod", "logsumexp", "dist", "cdist", "pdist", "cosine_similarity"}),
    "loss": frozenset({"cross_entropy", "cross_entropy_loss", "nll_loss", "nll_loss2d", "nll_loss_nd", "mse_loss",
                       "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "binary_cross_entropy",
                       "binary_cross_entropy_with_logits", "poisson_nll_loss", "cosine_embedding_loss",
                       "hinge_embedding_loss", "margin_ranking_loss", "multilabel_margin_loss",
                       "soft_margin_loss", "multilabel_soft_margin_loss", "triplet_margin_loss",
                       "multi_margin_loss", "ctc_loss"}),
    "exp_log_pow": frozenset({"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "pow", "float_power",
                              "reciprocal", "rsqrt", "softplus", "acos", "asin", "cosh", "sinh", "tan", "erfinv"}),
    "cumulative": frozenset({"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"}),
    # autocast's fp32 list has the FFTs; PyTorch's CPU FFT has no bfloat16 kernel at all (FNet's token mixing).
    "fft": frozenset({"fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2", "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft",
                      "fft_rfft2", "fft_irfft2", "fft_rfftn", "fft_irfftn", "fft_hfft", "fft_ihfft", "fft_hfftn",
                      "fft_ihfftn", "_fft_r2c", "_fft_c2c", "_fft_c2r", "stft", "istft"}),
}
DEFAULT_KEEP_FP32 = tuple(KEEP_FP32_CLASSES)

PROMOTE_OPS = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "linalg_cross", "dot", "vdot",
                         "grid_sampler", "index_put", "scatter_add", "tensordot", "index_copy", "cat", "stack"})

# call_module classes mapped to the op name they compute (for the keep_fp32 classes).
_MODULE_OPS = {"LayerNorm": "layer_norm", "RMSNorm": "rms_norm", "GroupNorm": "group_norm", "Softmax": "softmax",
               "LogSoftmax": "log_softmax", "Softmin": "softmin", "CrossEntropyLoss": "cross_entropy",
               "NLLLoss": "nll_loss", "MSELoss": "mse_loss", "L1Loss": "l1_loss", "SmoothL1Loss": "smooth_l1_loss",
               "HuberLoss": "huber_loss", "KLDivLoss": "kl_div", "BCELoss": "binary_cross_entropy",
               "BCEWithLogitsLoss": "binary_cross_entropy_with_logits", "Softplus": "softplus"}

# A call_module whose module (class or instance), or a call_function whose function, sets this attribute
# truthy takes low-precision inputs and handles its own parameters (e.g. attention kernels or the fused
# linear + cross-entropy installed by other passes).
LOW_PRECISION_ATTRIBUTE = "low_precision_ok"


def keep_fp32_names(keep_fp32: tuple[str, ...]) -> frozenset[str]:
    """Op names kept in float32 for the option value ``keep_fp32`` (class names and/or op names)."""
    names: set[str] = set()
    for entry in keep_fp32:
        names |= KEEP_FP32_CLASSES.get(entry, frozenset({entry}))
    return frozenset(names)


def is_known_op(name: str) -> bool:
    """True if ``name`` is a keep_fp32 class or an op PyTorch knows (``gelu``, ``tanh``...)."""
    if name in KEEP_FP32_CLASSES:
        return True
    try:
        getattr(torch.ops.aten, name)
        return True
    except (AttributeError, RuntimeError):
        return hasattr(torch, name) or hasattr(torch.nn.functional, name)


def classify(gm: torch.fx.GraphModule, node: torch.fx.Node, fp32_names: frozenset[str]) -> str:
    """The precision class of ``node``: ``low``, ``fp32``, ``promote``, ``module_fp32`` (a leaf module
    with float parameters: its inputs keep their original dtype) or ``other``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, LOW_PRECISION_ATTRIBUTE, False):
            return "low"
        name = type(module).__name__
        computed = _MODULE_OPS.get(name) or ("rms_norm" if name.endswith("RMSNorm") else
                                             "layer_norm" if name.endswith("LayerNorm") else None)
        if computed is not None and computed in fp32_names:
            return "fp32"
        has_float_state = any(t.is_floating_point() for t in list(module.parameters()) + list(module.buffers()))
        return "module_fp32" if has_float_state else "other"
    if node.op == "call_function" and getattr(node.target, LOW_PRECISION_ATTRIBUTE, False):
        return "low"  # a function another pass installed that takes low-precision inputs (fuse's loss head)
    name = op_name(node)
    if name is None or name.endswith("_") and name != "_":  # in-place ops cannot change dtype
        return "other"
    if name in LOW_PRECISION_OPS:
        return "low"
    if name in fp32_names:
        return "fp32"
    if name in PROMOTE_OPS:
        return "promote"
    return "other"
