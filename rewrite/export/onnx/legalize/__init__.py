"""Legalise an exported ONNX model for ONNX Runtime training 1.19: a sequence of named rewrites, one per
module, each returning how many places it changed (``infra``: ``Rewrite``, ``Sequential``).

In order (``speed``: only with ``speed_rewrites``, exact up to float32 round-off; ``training``: not for
inference models; ``low precision``: only with ``low_precision_in_float32``):

1. ``opset_converted``: default-domain opset ≤ 21 (``opset``).
2. ``value_types_inferred``: ONNX shape inference fills ``value_info`` (``infer_types``).
3. ``split_from_sequence``: ``SplitToSequence`` + constant ``SequenceAt`` → ``Split`` (``sequences_to_split``).
4. ``castlike_to_cast``: ``CastLike`` → ``Cast`` (``castlike_to_cast``).
5. ``axes_made_vectors``: 0-d ``axes`` → vectors (``vector_axes``).
6. ``redundant_casts_dropped``: casts to a tensor's own type, or repeated, dropped (``redundant_casts``).
7. ``layer_norm_decomposed`` (speed, training): float32 ``LayerNormalization`` as elementwise ops.
8. ``embedding_gathers_as_elements`` (speed, training): embedding ``Gather`` → ``GatherElements``.
9. ``layer_norm_bias_added`` (training): affine-free ``LayerNormalization`` gets constant scale and bias.
10. ``tanh_gelu_as_sigmoid`` (speed): GPT-2's tanh GELU as ``x·sigmoid(...)``.
11. ``cross_entropy_split`` (speed): ``SoftmaxCrossEntropyLoss`` → ``GatherElements`` − log-sum-exp.
12. ``gradient_outputs_named`` (training): ``LayerNormalization``'s Mean/InvStdDev, ``Dropout``'s mask.
13. ``neg_inf_constants``: ``-inf`` constants → a large finite negative (``finite_masks``).
14. ``nan_guards_dropped`` (speed): attention's NaN guard, once no ``-inf`` is left.
14'. ``where_inputs_expanded`` (training): a ``Where`` value input that broadcasts is ``Expand``ed first (ORT's
    ``Where`` gradient does not reduce broadcast dimensions; T5's position bias).
15. ``low_precision_ops_in_float32`` then ``redundant_casts_dropped`` again (low precision).
16. ``ir_version_lowered``: IR version ≤ 10 (``ir_version``).

``SumsAsAdds`` (``training_sums_as_adds``) runs later, on the training graph ``generate_artifacts`` writes.
"""

from __future__ import annotations

import onnx

from .castlike_to_cast import CastLikeToCast
from .cross_entropy import SplitCrossEntropy
from .embedding_gathers import GatherRowsAsElements
from .finite_masks import FiniteMasks
from .gradient_outputs import NameGradientOutputs
from .infer_types import InferTypes
from .infra import Rewrite, RewriteResult, Sequential
from .ir_version import MAX_IR_VERSION, LowerIrVersion
from .layer_norm_bias import LayerNormBias
from .layer_norm_decomposition import DecomposeLayerNorm
from .low_precision import LowPrecisionInFloat32
from .nan_guards import DropNanGuards
from .opset import MAX_OPSET, LowerOpset
from .redundant_casts import RedundantCasts
from .sequences_to_split import SequencesToSplit
from .sums_as_adds import SumsAsAdds
from .tanh_gelu import TanhGeluAsSigmoid
from .vector_axes import VectorAxes
from .where_broadcast import WhereBroadcastInputs

#: Steps 1-14' of the module docstring, in order; ``legalize_for_training`` keeps those that apply.
TRAINING_REWRITES: tuple[type[Rewrite], ...] = (
    LowerOpset, InferTypes, SequencesToSplit, CastLikeToCast, VectorAxes, RedundantCasts, DecomposeLayerNorm,
    GatherRowsAsElements, LayerNormBias, TanhGeluAsSigmoid, SplitCrossEntropy, NameGradientOutputs, FiniteMasks,
    DropNanGuards, WhereBroadcastInputs)


def legalization(inference: bool = False, low_precision_in_float32: bool = False,
                 speed_rewrites: bool = True) -> Sequential:
    """The rewrites that apply to a training (or, with ``inference``, an inference) model, in order."""
    rewrites: list[Rewrite] = [cls() for cls in TRAINING_REWRITES
                               if (speed_rewrites or not cls.speed) and not (inference and cls.training_only)]
    if low_precision_in_float32:
        rewrites += [LowPrecisionInFloat32(), RedundantCasts()]
    rewrites.append(LowerIrVersion())
    return Sequential(*rewrites)


def legalize_for_training(model: onnx.ModelProto, inference: bool = False,
                          low_precision_in_float32: bool = False, speed_rewrites: bool = True) -> dict[str, int]:
    """Rewrite ``model`` in place so ONNX Runtime 1.19 can train it (``effcompile.export.onnx``, step 2).

    ``low_precision_in_float32``: ONNX Runtime's CPU kernels have no bfloat16/float16 MatMul, Softmax, Add...:
    run each op that reads or writes such tensors in float32 between casts (values keep their low-precision
    rounding at every op boundary; only the arithmetic inside an op is wider, as on GPUs that accumulate
    bf16 matmuls in float32). Returns how many places each rewrite that ran changed, by rewrite name.
    Raises ExportError when a sequence op cannot be turned into ``Split``."""
    return legalization(inference, low_precision_in_float32, speed_rewrites)(model).counts


__all__ = ["MAX_IR_VERSION", "MAX_OPSET", "TRAINING_REWRITES", "CastLikeToCast", "DecomposeLayerNorm",
           "DropNanGuards", "FiniteMasks", "GatherRowsAsElements", "InferTypes", "LayerNormBias", "LowPrecisionInFloat32",
           "LowerIrVersion", "LowerOpset", "NameGradientOutputs", "RedundantCasts", "Rewrite", "RewriteResult",
           "SequencesToSplit", "Sequential", "SplitCrossEntropy", "SumsAsAdds", "TanhGeluAsSigmoid", "VectorAxes",
           "WhereBroadcastInputs", "legalization", "legalize_for_training"]
