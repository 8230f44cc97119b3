"""What the ONNX legalisation rewrites, the trainability checker and the exporter share: the model's value
types and constants, its default opset, type inference, node replacement, and where a node came from."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch.fx
from onnx import numpy_helper

from ...graph import module_path

log = logging.getLogger(__name__)

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}
LOW_PRECISION = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}
# A large finite negative per float type, for masks that were -inf.
FINITE_NEG = {onnx.TensorProto.FLOAT: -1e9, onnx.TensorProto.DOUBLE: -1e9, onnx.TensorProto.BFLOAT16: -1e9,
              onnx.TensorProto.FLOAT16: -3e4}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version, 0 if none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type of every named value the model declares (value_info, inputs, outputs, initializers)."""
    types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    for initializer in model.graph.initializer:
        types[initializer.name] = onnx.helper.make_tensor_type_proto(initializer.data_type, list(initializer.dims))
    return types


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of in-memory initializers and ``Constant`` nodes, by name."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_location == 0}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attribute = node.attribute[0]
            if attribute.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
            elif attribute.name in ("value_int", "value_ints", "value_float", "value_floats"):
                values[node.output[0]] = np.array(onnx.helper.get_attribute_value(attribute))
    return values


def static_dim(type_proto: onnx.TypeProto | None, axis: int) -> int | None:
    """The static size of dimension ``axis`` of a tensor type, or None (unknown or symbolic)."""
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if not dims:
        return None
    dim = dims[axis if axis >= 0 else len(dims) + axis]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def replace_nodes(model: onnx.ModelProto,
                  build: Callable[[onnx.NodeProto], list[onnx.NodeProto] | None]) -> int:
    """Replace each node for which ``build(node)`` returns a list of nodes by that list (``None``: keep the
    node). New nodes without a name get ``<first output>__<op>``, and each takes the replaced node's
    metadata (its module path). Returns how many nodes were replaced."""
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in list(model.graph.node):
        made = build(node)
        if made is None:
            nodes.append(node)
            continue
        for new in made:
            new.name = new.name or f"{new.output[0]}__{new.op_type}"
            new.metadata_props.extend(node.metadata_props)
        nodes.extend(made)
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


def reduce_node(op: str, data: str, axes: str, axes_values: Sequence[int], out: str, keepdims: int,
            opset: int) -> onnx.NodeProto:
    """``op(data)`` over ``axes_values``: from opset 18 on (13 for ReduceSum) as the input ``axes`` (an
    initializer holding them), before as an attribute."""
    if opset >= 18 or (op == "ReduceSum" and opset >= 13):
        return onnx.helper.make_node(op, [data, axes], [out], keepdims=keepdims)
    return onnx.helper.make_node(op, [data], [out], keepdims=keepdims, axes=[int(a) for a in axes_values])


def has_neg_inf(model: onnx.ModelProto) -> bool:
    """True if a constant the graph holds in memory still contains ``-inf`` (external data is not read)."""
    tensors = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    tensors += [i for i in model.graph.initializer if i.ByteSize() < 1 << 20]
    return any(t.data_type in FLOAT_TYPES and t.data_location == 0 and np.isneginf(numpy_helper.to_array(t)).any()
               for t in tensors)


def node_where(node: onnx.NodeProto, gm: torch.fx.GraphModule | None = None) -> str:
    """The module path (from the exporter's metadata and the captured graph) and node name of ``node``."""
    meta = {p.key: p.value for p in node.metadata_props}
    fx_name = None
    match = re.match(r"%(\w+)", meta.get("pkg.torch.onnx.fx_node", ""))
    if match:
        fx_name = match.group(1)
    path = None
    if gm is not None and fx_name is not None:
        for fx_node in gm.graph.nodes:
            if fx_node.name == fx_name:
                path = module_path(fx_node) or "<root module>"
                break
    if path is None:  # not a node of the captured graph: the exporter's scope is the best left
        path = meta.get("namespace", "").split(":")[-1].strip() or "?"
    return f"{path} (node {fx_name or node.name})"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (ONNX Runtime's C++ location dropped), at most 400 characters."""
    text = str(error).strip()
    if "[ONNXRuntimeError]" in text:  # drop the C++ source location and signature before ORT's message
        text = "ONNXRuntimeError" + text.split("[ONNXRuntimeError]", 1)[1]
    lines = text.splitlines()
    return lines[0][:400] if lines else type(error).__name__
