"""``redundant_casts_dropped``: a ``Cast`` to its input's own type, or a repeat of one, is dropped."""

from __future__ import annotations

import onnx

from ..helpers import value_types
from .infra import Rewrite


class RedundantCasts(Rewrite):
    """Drop each ``Cast`` whose input already has the target type, and merge ``Cast``s of one tensor to one
    type into the first; readers take the surviving tensor. Exact. They come from the exporter (a
    ``float32 → float32`` ``_to_copy``) and from ``LowPrecisionInFloat32``, which gives a bf16 tensor one
    float32 copy that the graph's own upcasts then read. ONNX Runtime 1.19's ``FastGeluFusion`` (run by
    ``generate_artifacts``) crashes the process on a tanh GELU whose ``x`` arrives through two such casts
    (Phi after ``amp``), and ``TanhGeluAsSigmoid`` needs one ``x`` to match. Casts that are graph
    outputs stay; so does everything when a node holds a subgraph. Returns how many casts went."""

    name = "redundant_casts_dropped"

    def call(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
            return 0
        known = {name: t.tensor_type.elem_type for name, t in value_types(model).items()
                 if t.HasField("tensor_type") and t.tensor_type.elem_type}
        outputs = {o.name for o in graph.output}
        renamed: dict[str, str] = {}
        first: dict[tuple[str, int], str] = {}
        kept: list[onnx.NodeProto] = []
        for node in graph.node:
            for index, name in enumerate(node.input):
                node.input[index] = renamed.get(name, name)
            to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
            if to is None or not node.input or node.output[0] in outputs:
                kept.append(node)
                continue
            source = node.input[0]
            if known.get(source) == to:
                renamed[node.output[0]] = source
            elif (source, to) in first:
                renamed[node.output[0]] = first[(source, to)]
            else:
                first[(source, to)] = node.output[0]
                known[node.output[0]] = to
                kept.append(node)
        if renamed:
            del graph.node[:]
            graph.node.extend(kept)
        return len(renamed)
