"""``layer_norm_decomposed`` (speed, training): float32 ``LayerNormalization`` → elementwise ops and reductions."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import default_opset, reduce_node, replace_nodes, value_types
from .infra import Rewrite


class DecomposeLayerNorm(Rewrite):
    """float32 ``LayerNormalization(x, scale, bias)`` → ``(x − mean)·(var + ε)^-½·scale + bias`` in
    ReduceMean / Sub / Mul / Sqrt / Reciprocal / Add. ONNX Runtime 1.19's ``LayerNormalizationGrad`` CPU
    kernel is single-threaded Eigen with four temporaries (≈8 ms per GPT-2-small norm on 2 cores, where
    PyTorch's takes <1); the gradients ORT builds for the pieces are threaded elementwise ops and fast
    reductions (a 12-norm chain: 90 → 50 ms per step, forward and backward). Same arithmetic as the
    kernel (mean, then the mean of squared deviations, in float32), so equal to round-off. Left alone:
    other dtypes (the kernel computes low precision in float32), norms whose mean / inverse-std outputs are
    read, and an axis that cannot be resolved without the input's rank. Returns how many were replaced."""

    name = "layer_norm_decomposed"
    speed = True
    training_only = True

    def call(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        types = value_types(model)
        opset = default_opset(model)
        readers = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}

        def build(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
            x_type = types.get(node.input[0]) if node.op_type == "LayerNormalization" and node.input else None
            if x_type is None or not x_type.HasField("tensor_type") or x_type.tensor_type.elem_type != onnx.TensorProto.FLOAT \
                    or any(o and o in readers for o in node.output[1:]) or len(node.input) < 2:
                return None
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axis = int(attrs.get("axis", -1))
            if axis >= 0:
                rank = len(x_type.tensor_type.shape.dim) if x_type.tensor_type.HasField("shape") else None
                if rank is None:
                    return None
                axis -= rank
            base = f"{node.output[0]}__ln"
            x, scale = node.input[0], node.input[1]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None

            def name(suffix: str, base: str = base) -> str:
                return f"{base}_{suffix}"

            axes, axes_values = name("axes"), np.arange(axis, 0, dtype=np.int64)
            graph.initializer.extend([numpy_helper.from_array(axes_values, axes),
                                      numpy_helper.from_array(np.array(float(attrs.get("epsilon", 1e-5)), np.float32),
                                                              name("eps"))])
            made = [reduce_node("ReduceMean", x, axes, axes_values, name("mean"), 1, opset),
                    onnx.helper.make_node("Sub", [x, name("mean")], [name("centered")]),
                    onnx.helper.make_node("Mul", [name("centered"), name("centered")], [name("squared")]),
                    reduce_node("ReduceMean", name("squared"), axes, axes_values, name("var"), 1, opset),
                    onnx.helper.make_node("Add", [name("var"), name("eps")], [name("var_eps")]),
                    onnx.helper.make_node("Sqrt", [name("var_eps")], [name("std")]),
                    onnx.helper.make_node("Reciprocal", [name("std")], [name("inv_std")]),
                    onnx.helper.make_node("Mul", [name("centered"), name("inv_std")], [name("normed")]),
                    onnx.helper.make_node("Mul", [name("normed"), scale], [name("scaled") if bias else node.output[0]])]
            if bias:
                made.append(onnx.helper.make_node("Add", [name("scaled"), bias], [node.output[0]]))
            return made

        return replace_nodes(model, build)
