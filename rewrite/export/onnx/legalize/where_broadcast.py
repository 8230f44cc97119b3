"""``where_inputs_expanded``: a ``Where`` whose value input broadcasts gets that input expanded to the full
shape first (training only). ORT 1.19's ``Where`` gradient does not reduce over broadcast dimensions: T5's
relative position bias ``[1, H, Sq, Sk]`` selected against a ``[B, 1, Sq, Sk]`` mask made the gradient
builder emit ``Squeeze`` of a ``[B, H, Sq, Sk]`` gradient ("Dimension of input 0 must be 1 instead of 2").
``Expand``'s gradient is a ``ReduceSum`` to the input's shape, so the gradient comes out right. Exact."""

from __future__ import annotations

import onnx

from ..helpers import FLOAT_TYPES, replace_nodes, value_types
from .infra import Rewrite


def _dims(type_proto: onnx.TypeProto | None) -> list[tuple[str, object]] | None:
    if type_proto is None or not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return [("value", d.dim_value) if d.HasField("dim_value") else ("param", d.dim_param or None)
            for d in type_proto.tensor_type.shape.dim]


class WhereBroadcastInputs(Rewrite):
    """``Where(c, x, y)`` with a float ``x`` (or ``y``) whose shape is not the output's →
    ``Where(c, Expand(Expand(x, Shape(c)), Shape(y)), y)``. Constants (``Constant`` nodes) are left alone: they
    need no gradient. Returns how many inputs were expanded."""

    name = "where_inputs_expanded"
    training_only = True

    def call(self, model: onnx.ModelProto) -> int:
        types = value_types(model)
        constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
        expanded = 0

        def build(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
            nonlocal expanded
            if node.op_type != "Where" or len(node.input) != 3:
                return None
            output = _dims(types.get(node.output[0]))
            made: list[onnx.NodeProto] = []
            where = onnx.NodeProto()
            where.CopyFrom(node)
            del where.metadata_props[:]  # replace_nodes gives every new node the replaced node's metadata
            for index in (1, 2):
                value = node.input[index]
                value_type = types.get(value)
                dims = _dims(value_type)
                if value in constants or dims is None or output is None or dims == output or \
                        value_type.tensor_type.elem_type not in FLOAT_TYPES:
                    continue
                others = [node.input[0], node.input[3 - index]]
                current = value
                for step, other in enumerate(others):
                    shape = f"{value}__where{node.output[0]}_shape{step}"
                    out = f"{value}__where{node.output[0]}_expand{step}"
                    made.append(onnx.helper.make_node("Shape", [other], [shape]))
                    made.append(onnx.helper.make_node("Expand", [current, shape], [out]))
                    current = out
                where.input[index] = current
                expanded += 1
            return made + [where] if made else None

        replace_nodes(model, build)
        return expanded
