"""``split_from_sequence``: ``SplitToSequence`` + constant-index ``SequenceAt`` → one ``Split``."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from ....errors import ExportError
from ..helpers import constant_values, node_where, static_dim, value_types
from .infra import Rewrite


class SequencesToSplit(Rewrite):
    """``SplitToSequence(x, sizes)`` read only by constant-index ``SequenceAt`` → ``Split(x, sizes)``."""

    name = "split_from_sequence"

    def call(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        constants = constant_values(model)
        types = value_types(model)
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        replaced, remove = 0, set()
        new_nodes: dict[int, onnx.NodeProto] = {}
        for node in graph.node:
            if node.op_type != "SplitToSequence":
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axis, keepdims = int(attrs.get("axis", 0)), int(attrs.get("keepdims", 1))
            users = readers.get(node.output[0], [])
            where = node_where(node)
            if not users or any(u.op_type != "SequenceAt" or u.input[1] not in constants for u in users):
                raise ExportError(f"onnx export: SplitToSequence at {where} feeds ops other than constant-index "
                                  "SequenceAt; ORT cannot differentiate sequences — index the split result with constants")
            dim = static_dim(types.get(node.input[0]), axis)
            if len(node.input) < 2 or node.input[1] not in constants or dim is None:
                raise ExportError(f"onnx export: SplitToSequence at {where} has a non-constant split or unknown "
                                  "dimension; use torch.split with static sizes")
            split = constants[node.input[1]].astype(np.int64).reshape(-1)
            sizes = [int(split[0])] * math.ceil(dim / int(split[0])) if split.size == 1 and len(node.input) > 1 \
                and constants[node.input[1]].ndim == 0 else [int(s) for s in split]
            if split.size == 1 and constants[node.input[1]].ndim == 0 and dim % int(split[0]):
                sizes[-1] = dim - int(split[0]) * (len(sizes) - 1)
            if not keepdims and set(sizes) != {1}:
                raise ExportError(f"onnx export: SplitToSequence at {where} with keepdims=0 and sizes {sizes}")
            base = node.output[0]
            outputs = [f"{base}__split{i}" for i in range(len(sizes))]
            sizes_name = f"{base}__sizes"
            graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), sizes_name))
            new_nodes[id(node)] = onnx.helper.make_node("Split", [node.input[0], sizes_name], outputs, axis=axis,
                                                        name=node.name or base)
            new_nodes[id(node)].metadata_props.extend(node.metadata_props)
            for user in users:
                index = int(constants[user.input[1]])
                source = outputs[index]
                if keepdims:
                    replacement = onnx.helper.make_node("Identity", [source], [user.output[0]], name=user.name)
                else:
                    axes_name = f"{base}__axes"
                    if not any(i.name == axes_name for i in graph.initializer):
                        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes_name))
                    replacement = onnx.helper.make_node("Squeeze", [source, axes_name], [user.output[0]], name=user.name)
                replacement.metadata_props.extend(user.metadata_props)
                new_nodes[id(user)] = replacement
            replaced += 1
        if not replaced:
            return 0
        nodes = [new_nodes.get(id(n), n) for n in graph.node if id(n) not in remove]
        del graph.node[:]
        graph.node.extend(nodes)
        return replaced
