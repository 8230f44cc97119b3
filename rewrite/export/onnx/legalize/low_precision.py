"""``low_precision_ops_in_float32``: ops on bf16/fp16 tensors run in float32 between casts (CPU-only ORT)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import LOW_PRECISION, value_types
from .infra import Rewrite

# Ops that only move or reinterpret data: every ORT CPU kernel type covers them, so they need no float copy.
TYPE_AGNOSTIC = {"Cast", "Constant", "Identity"}


class LowPrecisionInFloat32(Rewrite):
    """Give each op that reads/writes bf16/fp16 float32 copies of its inputs and cast its outputs back.
    Each low-precision tensor gets one shared float32 copy, so its gradient is never summed in low precision."""

    name = "low_precision_ops_in_float32"

    def call(self, model: onnx.ModelProto) -> int:
        types = value_types(model)

        def elem(name: str) -> int:
            value = types.get(name)
            return value.tensor_type.elem_type if value is not None and value.HasField("tensor_type") else 0

        nodes: list[onnx.NodeProto] = []
        copies: dict[str, str] = {}

        def float_copy(name: str) -> str:
            if name not in copies:
                copies[name] = f"{name}__as_float32"
                nodes.append(onnx.helper.make_node("Cast", [name], [copies[name]], to=onnx.TensorProto.FLOAT,
                                                   name=f"{name}__to_float32"))
            return copies[name]

        rewritten = 0
        for node in model.graph.node:
            low_inputs = [i for i, name in enumerate(node.input) if name and elem(name) in LOW_PRECISION]
            low_outputs = [i for i, name in enumerate(node.output) if name and elem(name) in LOW_PRECISION]
            if node.op_type in TYPE_AGNOSTIC or not (low_inputs or low_outputs):
                if node.op_type == "Cast" and low_inputs:
                    node.input[0] = float_copy(node.input[0])  # one reader per low-precision tensor
                nodes.append(node)
                continue
            for i in low_inputs:
                node.input[i] = float_copy(node.input[i])
            casts_back = []
            for i in low_outputs:
                original = node.output[i]
                node.output[i] = f"{original}__float32"
                casts_back.append(onnx.helper.make_node("Cast", [node.output[i]], [original], to=elem(original),
                                                        name=f"{original}__to_low_precision"))
            for attribute in node.attribute:  # e.g. ConstantOfShape's value: now produced in float32
                if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in LOW_PRECISION:
                    value = numpy_helper.to_array(attribute.t).astype(np.float32)
                    attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))
                elif attribute.name in ("dtype", "to") and attribute.type == onnx.AttributeProto.INT \
                        and attribute.i in LOW_PRECISION:
                    attribute.i = onnx.TensorProto.FLOAT
            nodes.append(node)
            nodes.extend(casts_back)
            rewritten += 1
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return rewritten
