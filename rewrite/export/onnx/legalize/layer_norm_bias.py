"""``layer_norm_bias_added`` (training): affine-free ``LayerNormalization`` gets constant scale and bias."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import constant_values, value_types
from .infra import Rewrite


class LayerNormBias(Rewrite):
    """Give each ``LayerNormalization`` without affine parameters (``F.layer_norm(x, shape)``, as OLMo's norm)
    constant initializers: the exporter builds its scale as ``Expand(Constant 1, Shape(x))`` and passes no
    bias, and ONNX Runtime 1.19's gradient builder fails on both (it reads a bias input; it defines the
    expanded scale's gradient twice). The scale becomes ``full(shape, c)`` and the bias zeros, both of the
    scale's static shape and type; the dead ``Expand`` chain is dropped. Exact. Returns how many nodes
    changed (a scale of unknown shape is left alone)."""

    name = "layer_norm_bias_added"
    training_only = True

    def call(self, model: onnx.ModelProto) -> int:
        types = value_types(model)
        constants = constant_values(model)
        producer = {o: n for n in model.graph.node for o in n.output}
        users: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                users[name] = users.get(name, 0) + 1
        count = 0
        dead: set[int] = set()
        for node in model.graph.node:
            if node.op_type != "LayerNormalization" or len(node.input) < 2:
                continue
            scale_type = types.get(node.input[1])
            if scale_type is None or not scale_type.HasField("tensor_type"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in scale_type.tensor_type.shape.dim]
            if not dims or None in dims:
                continue
            elem = scale_type.tensor_type.elem_type or onnx.TensorProto.FLOAT
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            stem = f"{node.name or 'layer_norm'}__{count}"
            expand = producer.get(node.input[1])
            changed = False
            if expand is not None and expand.op_type == "Expand" and users.get(node.input[1]) == 1 and \
                    expand.input[0] in constants and constants[expand.input[0]].size == 1:
                value = float(constants[expand.input[0]].reshape(()))
                model.graph.initializer.append(numpy_helper.from_array(np.full(dims, value, dtype=dtype), f"{stem}_scale"))
                node.input[1] = f"{stem}_scale"
                dead.add(id(expand))
                changed = True
            if len(node.input) < 3 or not node.input[2]:
                model.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, dtype=dtype), f"{stem}_bias"))
                if len(node.input) < 3:
                    node.input.append(f"{stem}_bias")
                else:
                    node.input[2] = f"{stem}_bias"
                changed = True
            count += changed
        if dead:
            kept = [n for n in model.graph.node if id(n) not in dead]
            del model.graph.node[:]
            model.graph.node.extend(kept)
        return count
