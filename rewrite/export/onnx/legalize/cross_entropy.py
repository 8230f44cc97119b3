"""``cross_entropy_split`` (speed): ``SoftmaxCrossEntropyLoss`` → ``GatherElements`` − log-sum-exp in threaded ops."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import default_opset, reduce_node, replace_nodes, value_types
from .infra import Rewrite


class SplitCrossEntropy(Rewrite):
    """``SoftmaxCrossEntropyLoss(scores[N, C], labels)`` → ``GatherElements(scores, labels) -
    logsumexp(scores)`` (``_log_sum_exp``) + a masked mean: ONNX Runtime's CPU kernels for the fused op and its gradient
    are slow over a 50k-word vocabulary (about the LM head matmul's time); the pieces are quicker."""

    name = "cross_entropy_split"
    speed = True

    def call(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        types = value_types(model)
        readers = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}

        def build(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            scores_type = types.get(node.input[0]) if node.input else None
            rank = len(scores_type.tensor_type.shape.dim) if scores_type is not None and \
                scores_type.HasField("tensor_type") and scores_type.tensor_type.HasField("shape") else None
            if node.op_type != "SoftmaxCrossEntropyLoss" or (len(node.input) > 2 and node.input[2]) or rank != 2 \
                    or any(o in readers for o in node.output[1:]):
                return None
            base = node.output[0]
            reduction = attrs.get("reduction", b"mean")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            scores, labels = node.input[0], node.input[1]

            def name(suffix: str, base: str = base) -> str:
                return f"{base}__{suffix}"

            def const(suffix: str, value: np.ndarray, base: str = base) -> str:
                graph.initializer.append(numpy_helper.from_array(value, f"{base}__{suffix}"))
                return f"{base}__{suffix}"

            axis = const("axis", np.array([1], np.int64))
            # log p[label] = score[label] - logsumexp(scores): the only [N, C]-sized gradient is softmax's, which
            # ORT builds from threaded elementwise ops (LogSoftmaxGrad is a single-threaded kernel)
            made = _log_sum_exp(scores, axis, name, const, scores_type.tensor_type.elem_type, default_opset(model))
            keep = None
            if "ignore_index" in attrs:
                made += [onnx.helper.make_node("Equal", [labels, const("ignore", np.array(attrs["ignore_index"], np.int64))],
                                               [name("ignored")]),
                         onnx.helper.make_node("Where", [name("ignored"), const("zero_index", np.array(0, np.int64)), labels],
                                               [name("safe_labels")]),
                         onnx.helper.make_node("Not", [name("ignored")], [name("kept_bool")]),
                         onnx.helper.make_node("Cast", [name("kept_bool")], [name("kept")],
                                               to=scores_type.tensor_type.elem_type)]
                labels, keep = name("safe_labels"), name("kept")
            made += [onnx.helper.make_node("Unsqueeze", [labels, axis], [name("index")]),
                     onnx.helper.make_node("GatherElements", [scores, name("index")], [name("picked2d")], axis=1),
                     onnx.helper.make_node("Squeeze", [name("picked2d"), axis], [name("picked_score")]),
                     onnx.helper.make_node("Sub", [name("picked_score"), name("log_sum_exp")], [name("picked")])]
            picked = name("picked")
            if keep is not None:
                made.append(onnx.helper.make_node("Mul", [picked, keep], [name("picked_kept")]))
                picked = name("picked_kept")
            if reduction == "none":
                made.append(onnx.helper.make_node("Neg", [picked], [base]))
            else:
                made.append(onnx.helper.make_node("ReduceSum", [picked], [name("total")], keepdims=0))
                if reduction == "sum":
                    made.append(onnx.helper.make_node("Neg", [name("total")], [base]))
                elif keep is not None:
                    made += [onnx.helper.make_node("ReduceSum", [keep], [name("count")], keepdims=0),
                             onnx.helper.make_node("Div", [name("total"), name("count")], [name("mean")]),
                             onnx.helper.make_node("Neg", [name("mean")], [base])]
                else:
                    made += [onnx.helper.make_node("ReduceMean", [picked], [name("mean")], keepdims=0),
                             onnx.helper.make_node("Neg", [name("mean")], [base])]
            return made

        return replace_nodes(model, build)


def _log_sum_exp(scores: str, axis: str, name, const, elem_type: int, opset: int) -> list[onnx.NodeProto]:
    """``logsumexp(scores, axis 1)`` → ``name("log_sum_exp")`` [N] as ``m + log Σ exp(scores − m)`` with the
    shift ``m`` the row maximum truncated to an integer through an int32 cast. ``ReduceLogSumExp`` is one
    single-threaded pass over [N, C] (≈140 ms for GPT-2's 1024 × 50257 on 2 cores) and its gradient is three
    more; here every [N, C] op is a threaded elementwise op or a fast reduction, and the gradient is two
    (the broadcast of ΣExp's gradient and Exp's). The shift only has to keep ``exp`` in range (any ``m``
    gives the same value, to round-off), so its gradient, which cancels exactly, is not built: ORT stops
    at the integer tensor (it has no ReduceMax gradient). The clip keeps the cast defined for rows whose
    maximum is ±inf or beyond int32 (their log-sum-exp is ±inf or NaN either way)."""
    clip_min = const("shift_min", np.array(-1e9, onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    clip_max = const("shift_max", np.array(1e9, onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    return [reduce_node("ReduceMax", scores, axis, [1], name("row_max"), 1, opset),
            onnx.helper.make_node("Clip", [name("row_max"), clip_min, clip_max], [name("row_max_clipped")]),
            onnx.helper.make_node("Cast", [name("row_max_clipped")], [name("shift_int")], to=onnx.TensorProto.INT32),
            onnx.helper.make_node("Cast", [name("shift_int")], [name("shift")], to=elem_type),
            onnx.helper.make_node("Sub", [scores, name("shift")], [name("shifted")]),
            onnx.helper.make_node("Exp", [name("shifted")], [name("exp")]),
            reduce_node("ReduceSum", name("exp"), axis, [1], name("sum_exp"), 1, opset),
            onnx.helper.make_node("Log", [name("sum_exp")], [name("log_sum_shifted")]),
            onnx.helper.make_node("Add", [name("log_sum_shifted"), name("shift")], [name("log_sum_exp2d")]),
            onnx.helper.make_node("Squeeze", [name("log_sum_exp2d"), axis], [name("log_sum_exp")])]
