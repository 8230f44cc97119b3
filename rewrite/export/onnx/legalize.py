"""Legalise an exported ONNX model for ONNX Runtime training 1.19, and check it can be trained.

The rewrites (``legalize_for_training``) and the gradient check (``check_trainable``) that
``effcompile.export.onnx`` runs between ``torch.onnx.export`` and ``generate_artifacts``; each rewrite is
one private function returning how many places it changed. See ``effcompile.export.onnx`` for the order.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np
import onnx
import torch
import torch.fx
from onnx import numpy_helper

from ...errors import EffcompileError
from ...graph import module_path

log = logging.getLogger(__name__)

MAX_IR_VERSION = 10
MAX_OPSET = 21

FINITE_NEG = {onnx.TensorProto.FLOAT: -1e9, onnx.TensorProto.DOUBLE: -1e9, onnx.TensorProto.BFLOAT16: -1e9,
              onnx.TensorProto.FLOAT16: -3e4}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}

# Ops ONNX Runtime 1.19's gradient builder knows (orttraining gradient_builder_registry.cc).
ORT_GRADIENT_OPS = frozenset("""
Cast Sin Cos Log Tanh Sqrt Erf MatMul Split Relu Pow ReduceMean ReduceSum ReduceLogSumExp ReduceL2 Add Sub Mul
Div Neg Concat ConcatTraining Reshape Transpose Gemm MaxPool Gather Conv Squeeze Unsqueeze Sigmoid Softmax
LogSoftmax SoftmaxCrossEntropy SparseSoftmaxCrossEntropy SoftmaxCrossEntropyLoss GlobalAveragePool AveragePool
Dropout GatherND GatherElements Gelu BiasGelu FastGelu LayerNormalization SimplifiedLayerNormalization
BatchNormInternal MegatronF MegatronG Slice Where Send Recv Expand Exp Flatten TopK Clip Abs Min Max Tile ATenOp
Pad Identity PythonOp ScatterND ScatterElements Reciprocal LeakyRelu QuickGelu ConvTranspose Resize
""".split())
# Inputs that carry no gradient (indices, shapes, conditions) by op: they neither need nor block one.
NON_DIFFERENTIABLE_INPUTS = {
    "Where": {0}, "Gather": {1}, "GatherND": {1}, "GatherElements": {1}, "Reshape": {1}, "Expand": {1},
    "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3}, "Split": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "Tile": {1},
    "ReduceMean": {1}, "ReduceSum": {1}, "ReduceL2": {1}, "ReduceLogSumExp": {1}, "Clip": {1, 2},
    "SoftmaxCrossEntropyLoss": {1, 2}, "Dropout": {1, 2}, "TopK": {1}, "ScatterND": {1},
    "ScatterElements": {1}, "Pow": {1}, "Resize": {1, 2, 3},
}


_NON_FLOAT_OUTPUT_OPS = frozenset("""Shape Size IsNaN IsInf Equal Less LessOrEqual Greater GreaterOrEqual And Or Not
Xor NonZero ArgMax ArgMin""".split())


class ExportError(EffcompileError):
    """The program cannot be exported to ONNX or trained in ONNX Runtime as it stands."""


# --------------------------------------------------------------------------------------------- legalisation

def legalize_for_training(model: onnx.ModelProto, inference: bool = False,
                          low_precision_in_float32: bool = False, speed_rewrites: bool = True) -> dict[str, int]:
    """Rewrite ``model`` in place so ONNX Runtime 1.19 can train it (``effcompile.export.onnx``, step 2).

    ``low_precision_in_float32``: ONNX Runtime's CPU kernels have no bfloat16/float16 MatMul, Softmax, Add...:
    run each op that reads or writes such tensors in float32 between casts (values keep their low-precision
    rounding at every op boundary; only the arithmetic inside an op is wider, as on GPUs that accumulate
    bf16 matmuls in float32). Returns counts of each fix. Raises ExportError when a sequence op cannot be
    turned into ``Split``."""
    stats = {"ir_version_lowered": 0, "opset_converted": 0, "split_from_sequence": 0, "castlike_to_cast": 0,
             "gradient_outputs_named": 0, "neg_inf_constants": 0, "low_precision_ops_in_float32": 0,
             "tanh_gelu_as_sigmoid": 0, "nan_guards_dropped": 0, "cross_entropy_split": 0,
             "layer_norm_bias_added": 0, "axes_made_vectors": 0, "layer_norm_decomposed": 0, "redundant_casts_dropped": 0,
             "embedding_gathers_as_elements": 0}
    if _default_opset(model) > MAX_OPSET:
        converted = onnx.version_converter.convert_version(model, MAX_OPSET)
        model.CopyFrom(converted)
        stats["opset_converted"] = 1
    _infer_types(model)
    stats["split_from_sequence"] = _sequences_to_split(model)
    stats["castlike_to_cast"] = _castlike_to_cast(model)
    stats["axes_made_vectors"] = _vector_axes(model)
    stats["redundant_casts_dropped"] = _redundant_casts(model)
    if speed_rewrites and not inference:
        stats["layer_norm_decomposed"] = _decompose_layer_norm(model)
        stats["embedding_gathers_as_elements"] = _gather_rows_as_elements(model)
    if not inference:
        stats["layer_norm_bias_added"] = _layer_norm_bias(model)
    if speed_rewrites:
        stats["tanh_gelu_as_sigmoid"] = _tanh_gelu_as_sigmoid(model)
        stats["cross_entropy_split"] = _split_cross_entropy(model)
    if not inference:
        stats["gradient_outputs_named"] = _name_gradient_outputs(model)
    stats["neg_inf_constants"] = _finite_masks(model)
    if speed_rewrites and not _has_neg_inf(model):
        stats["nan_guards_dropped"] = _drop_nan_guards(model)
    if low_precision_in_float32:
        stats["low_precision_ops_in_float32"] = _low_precision_in_float32(model)
        stats["redundant_casts_dropped"] += _redundant_casts(model)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        stats["ir_version_lowered"] = 1
    return stats


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _infer_types(model: onnx.ModelProto) -> None:
    """Fill ``value_info`` by ONNX shape inference, run on a copy whose large initializers are typed graph
    inputs instead (no tensor data: works for models over the 2 GB protobuf limit too)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    for initializer in model.graph.initializer:
        elements = int(np.prod(initializer.dims)) if initializer.dims else 1
        if elements <= 64 and initializer.data_location == 0:  # shape constants: inference reads their values
            light.graph.initializer.append(initializer)
        else:
            light.graph.input.append(onnx.helper.make_tensor_value_info(initializer.name, initializer.data_type,
                                                                        list(initializer.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as error:  # shapes are a help here, not a need
        log.debug("ONNX shape inference failed: %s", error)
        return
    # the exporter's own value_info (from PyTorch's fake tensors) is the better one: keep it, add the rest
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    for initializer in model.graph.initializer:
        types[initializer.name] = onnx.helper.make_tensor_type_proto(initializer.data_type, list(initializer.dims))
    return types


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_location == 0}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attribute = node.attribute[0]
            if attribute.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
            elif attribute.name in ("value_int", "value_ints", "value_float", "value_floats"):
                values[node.output[0]] = np.array(onnx.helper.get_attribute_value(attribute))
    return values


def _sequences_to_split(model: onnx.ModelProto) -> int:
    """``SplitToSequence(x, sizes)`` read only by constant-index ``SequenceAt`` → ``Split(x, sizes)``."""
    graph = model.graph
    constants = _constants(model)
    types = _value_types(model)
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
        where = _node_where(node)
        if not users or any(u.op_type != "SequenceAt" or u.input[1] not in constants for u in users):
            raise ExportError(f"onnx export: SplitToSequence at {where} feeds ops other than constant-index "
                              "SequenceAt; ORT cannot differentiate sequences — index the split result with constants")
        dim = _static_dim(types.get(node.input[0]), axis)
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


def _static_dim(type_proto: onnx.TypeProto | None, axis: int) -> int | None:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if not dims:
        return None
    dim = dims[axis if axis >= 0 else len(dims) + axis]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def _castlike_to_cast(model: onnx.ModelProto) -> int:
    types = _value_types(model)
    count = 0
    for node in model.graph.node:
        if node.op_type != "CastLike":
            continue
        like = types.get(node.input[1])
        if like is None or not like.HasField("tensor_type") or not like.tensor_type.elem_type:
            continue
        to = like.tensor_type.elem_type
        del node.attribute[:]
        del node.input[1:]
        node.op_type = "Cast"
        node.attribute.append(onnx.helper.make_attribute("to", to))
        count += 1
    return count


def _redundant_casts(model: onnx.ModelProto) -> int:
    """Drop each ``Cast`` whose input already has the target type, and merge ``Cast``s of one tensor to one
    type into the first; readers take the surviving tensor. Exact. They come from the exporter (a
    ``float32 → float32`` ``_to_copy``) and from ``_low_precision_in_float32``, which gives a bf16 tensor one
    float32 copy that the graph's own upcasts then read. ONNX Runtime 1.19's ``FastGeluFusion`` (run by
    ``generate_artifacts``) crashes the process on a tanh GELU whose ``x`` arrives through two such casts
    (Phi after ``amp``), and ``_tanh_gelu_as_sigmoid`` needs one ``x`` to match. Casts that are graph
    outputs stay; so does everything when a node holds a subgraph. Returns how many casts went."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0
    known = {name: t.tensor_type.elem_type for name, t in _value_types(model).items()
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


def _vector_axes(model: onnx.ModelProto) -> int:
    """Give every ``Unsqueeze``/``Squeeze`` whose ``axes`` is a 0-d constant (``_constants``: an initializer or
    a ``Constant`` node) a 1-element vector instead. The exporter's translation of SDPA's ``enable_gqa``
    (grouped key/value heads, e.g. inside ``remat``'s checkpointed Llama blocks) unsqueezes with a scalar axis;
    ORT's Unsqueeze accepts it, but the gradient builder reuses the same axes for the ``Squeeze`` of the
    gradient, and Squeeze requires a vector (``An axes tensor must be a vector tensor`` at the first training
    step). Returns how many inputs changed."""
    graph = model.graph
    scalars = {name: value for name, value in _constants(model).items() if value.ndim == 0}
    vectors: dict[str, str] = {}
    count = 0
    for node in graph.node:
        if node.op_type not in ("Unsqueeze", "Squeeze") or len(node.input) < 2 or node.input[1] not in scalars:
            continue
        source = node.input[1]
        if source not in vectors:
            vectors[source] = f"{source}__vector"
            graph.initializer.append(numpy_helper.from_array(scalars[source].reshape(1).astype(np.int64),
                                                             vectors[source]))
        node.input[1] = vectors[source]
        count += 1
    return count


def _layer_norm_bias(model: onnx.ModelProto) -> int:
    """Give each ``LayerNormalization`` without affine parameters (``F.layer_norm(x, shape)``, as OLMo's norm)
    constant initializers: the exporter builds its scale as ``Expand(Constant 1, Shape(x))`` and passes no
    bias, and ONNX Runtime 1.19's gradient builder fails on both (it reads a bias input; it defines the
    expanded scale's gradient twice). The scale becomes ``full(shape, c)`` and the bias zeros, both of the
    scale's static shape and type; the dead ``Expand`` chain is dropped. Exact. Returns how many nodes
    changed (a scale of unknown shape is left alone)."""
    types = _value_types(model)
    constants = _constants(model)
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


LOW_PRECISION = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}
# Ops that only move or reinterpret data: every ORT CPU kernel type covers them, so they need no float copy.
_TYPE_AGNOSTIC = {"Cast", "Constant", "Identity"}


def _low_precision_in_float32(model: onnx.ModelProto) -> int:
    """Give each op that reads/writes bf16/fp16 float32 copies of its inputs and cast its outputs back.
    Each low-precision tensor gets one shared float32 copy, so its gradient is never summed in low precision."""
    types = _value_types(model)

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
        if node.op_type in _TYPE_AGNOSTIC or not (low_inputs or low_outputs):
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


def _tanh_gelu_as_sigmoid(model: onnx.ModelProto) -> int:
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` (GPT-2's GELU, exported op by op) →
    ``x·sigmoid(x·(c₁ + c₂·x²))`` with c₁ = 2√(2/π), c₂ = 0.044715·c₁: the same function
    (0.5·(1 + tanh u) = sigmoid(2u)), in a form ONNX Runtime does not fuse into ``FastGelu``, whose CPU
    gradient kernel took ≈75 ms per GPT-2-small layer where these threaded elementwise ops take ≈30."""
    graph = model.graph
    constants = _constants(model)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def scalar(name: str, value: float) -> bool:
        array = constants.get(name)
        return array is not None and array.size == 1 and abs(float(array.reshape(-1)[0]) - value) < 1e-4 * max(1, abs(value))

    def split_const(node: onnx.NodeProto | None, op: str, value: float) -> str | None:
        """For ``op(v, const)`` (either order) with const == value, return v."""
        if node is None or node.op_type != op or len(node.input) != 2:
            return None
        a, b = node.input
        return a if scalar(b, value) else b if scalar(a, value) else None

    fused, dead = 0, set()
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for tanh in graph.node:
        if tanh.op_type != "Tanh":
            continue
        scaled = producer.get(tanh.input[0])
        inner = split_const(scaled, "Mul", math.sqrt(2 / math.pi))
        add = producer.get(inner) if inner else None
        if add is None or add.op_type != "Add":
            continue
        x = None
        for candidate, other in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            cube = split_const(producer.get(other), "Mul", 0.044715)
            power = producer.get(cube) if cube else None
            if power is not None and power.op_type == "Pow" and power.input[0] == candidate and scalar(power.input[1], 3.0):
                x, pieces = candidate, [scaled, add, producer[other], power]
                break
        if x is None:
            continue
        plus_one = [r for r in readers.get(tanh.output[0], []) if split_const(r, "Add", 1.0) == tanh.output[0]]
        if len(plus_one) != 1 or len(readers.get(tanh.output[0], [])) != 1:
            continue
        outer = readers.get(plus_one[0].output[0], [])
        if len(outer) != 1 or outer[0].op_type != "Mul":
            continue
        half_name = [i for i in outer[0].input if i != plus_one[0].output[0]]
        half = producer.get(half_name[0]) if len(half_name) == 1 else None
        if split_const(half, "Mul", 0.5) != x:
            continue
        chain = pieces + [tanh, plus_one[0]] + ([half] if len(readers.get(half.output[0], [])) == 1 else [])
        if any(len(readers.get(n.output[0], [])) != 1 for n in pieces):
            continue  # an intermediate is read elsewhere: leave the pattern alone
        out = outer[0].output[0]
        c1 = f"{out}__c1"
        c2 = f"{out}__c2"
        graph.initializer.extend([numpy_helper.from_array(np.array(2 * math.sqrt(2 / math.pi), np.float32), c1),
                                  numpy_helper.from_array(np.array(2 * math.sqrt(2 / math.pi) * 0.044715, np.float32), c2)])
        made = [onnx.helper.make_node("Mul", [x, x], [f"{out}__x2"]),
                onnx.helper.make_node("Mul", [f"{out}__x2", c2], [f"{out}__a"]),
                onnx.helper.make_node("Add", [f"{out}__a", c1], [f"{out}__b"]),
                onnx.helper.make_node("Mul", [x, f"{out}__b"], [f"{out}__z"]),
                onnx.helper.make_node("Sigmoid", [f"{out}__z"], [f"{out}__s"]),
                onnx.helper.make_node("Mul", [x, f"{out}__s"], [out])]
        for new_node in made:
            new_node.name = f"{new_node.output[0]}__gelu"
            new_node.metadata_props.extend(tanh.metadata_props)
        replacements[id(outer[0])] = made
        dead.update(id(n) for n in chain)
        fused += 1
    if fused:
        nodes = [m for n in graph.node if id(n) not in dead for m in replacements.get(id(n), [n])]
        del graph.node[:]
        graph.node.extend(nodes)
    return fused


def _split_cross_entropy(model: onnx.ModelProto) -> int:
    """``SoftmaxCrossEntropyLoss(scores[N, C], labels)`` → ``GatherElements(scores, labels) -
    logsumexp(scores)`` (``_log_sum_exp``) + a masked mean: ONNX Runtime's CPU kernels for the fused op and its gradient
    are slow over a 50k-word vocabulary (about the LM head matmul's time); the pieces are quicker."""
    graph = model.graph
    types = _value_types(model)
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
        made = _log_sum_exp(scores, axis, name, const, scores_type.tensor_type.elem_type, _default_opset(model))
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

    return _replace_nodes(model, build)


def _replace_nodes(model: onnx.ModelProto, build) -> int:
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


def _reduce(op: str, data: str, axes: str, axes_values: Sequence[int], out: str, keepdims: int,
            opset: int) -> onnx.NodeProto:
    """``op(data)`` over ``axes_values``: from opset 18 on (13 for ReduceSum) as the input ``axes`` (an
    initializer holding them), before as an attribute."""
    if opset >= 18 or (op == "ReduceSum" and opset >= 13):
        return onnx.helper.make_node(op, [data, axes], [out], keepdims=keepdims)
    return onnx.helper.make_node(op, [data], [out], keepdims=keepdims, axes=[int(a) for a in axes_values])


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
    return [_reduce("ReduceMax", scores, axis, [1], name("row_max"), 1, opset),
            onnx.helper.make_node("Clip", [name("row_max"), clip_min, clip_max], [name("row_max_clipped")]),
            onnx.helper.make_node("Cast", [name("row_max_clipped")], [name("shift_int")], to=onnx.TensorProto.INT32),
            onnx.helper.make_node("Cast", [name("shift_int")], [name("shift")], to=elem_type),
            onnx.helper.make_node("Sub", [scores, name("shift")], [name("shifted")]),
            onnx.helper.make_node("Exp", [name("shifted")], [name("exp")]),
            _reduce("ReduceSum", name("exp"), axis, [1], name("sum_exp"), 1, opset),
            onnx.helper.make_node("Log", [name("sum_exp")], [name("log_sum_shifted")]),
            onnx.helper.make_node("Add", [name("log_sum_shifted"), name("shift")], [name("log_sum_exp2d")]),
            onnx.helper.make_node("Squeeze", [name("log_sum_exp2d"), axis], [name("log_sum_exp")])]


def _decompose_layer_norm(model: onnx.ModelProto) -> int:
    """float32 ``LayerNormalization(x, scale, bias)`` → ``(x − mean)·(var + ε)^-½·scale + bias`` in
    ReduceMean / Sub / Mul / Sqrt / Reciprocal / Add. ONNX Runtime 1.19's ``LayerNormalizationGrad`` CPU
    kernel is single-threaded Eigen with four temporaries (≈8 ms per GPT-2-small norm on 2 cores, where
    PyTorch's takes <1); the gradients ORT builds for the pieces are threaded elementwise ops and fast
    reductions (a 12-norm chain: 90 → 50 ms per step, forward and backward). Same arithmetic as the
    kernel (mean, then the mean of squared deviations, in float32), so equal to round-off. Left alone:
    other dtypes (the kernel computes low precision in float32), norms whose mean / inverse-std outputs are
    read, and an axis that cannot be resolved without the input's rank. Returns how many were replaced."""
    graph = model.graph
    types = _value_types(model)
    opset = _default_opset(model)
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
        made = [_reduce("ReduceMean", x, axes, axes_values, name("mean"), 1, opset),
                onnx.helper.make_node("Sub", [x, name("mean")], [name("centered")]),
                onnx.helper.make_node("Mul", [name("centered"), name("centered")], [name("squared")]),
                _reduce("ReduceMean", name("squared"), axes, axes_values, name("var"), 1, opset),
                onnx.helper.make_node("Add", [name("var"), name("eps")], [name("var_eps")]),
                onnx.helper.make_node("Sqrt", [name("var_eps")], [name("std")]),
                onnx.helper.make_node("Reciprocal", [name("std")], [name("inv_std")]),
                onnx.helper.make_node("Mul", [name("centered"), name("inv_std")], [name("normed")]),
                onnx.helper.make_node("Mul", [name("normed"), scale], [name("scaled") if bias else node.output[0]])]
        if bias:
            made.append(onnx.helper.make_node("Add", [name("scaled"), bias], [node.output[0]]))
        return made

    return _replace_nodes(model, build)


def _gather_rows_as_elements(model: onnx.ModelProto) -> int:
    """``Gather(table[V, D], ids, axis=0)`` of a float initializer (an embedding lookup) →
    ``GatherElements(table, Expand(ids[n, 1], [1, D]), axis=0)`` reshaped to ``ids.shape + [D]``: the same
    rows, but ORT builds the table's gradient with ``GatherElementsGrad`` (≈24 ms for GPT-2's 50257 × 768
    table and 1024 ids on 2 cores) instead of ``GatherGrad`` (≈96 ms, single-threaded). Exact (a repeated
    id's rows are summed in another order: round-off). Returns how many lookups changed."""
    graph = model.graph
    tables = {i.name: i for i in graph.initializer if len(i.dims) == 2 and i.data_type in FLOAT_TYPES}

    def build(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] not in tables or axis != 0:
            return None
        base = f"{node.output[0]}__rows"
        width = tables[node.input[0]].dims[1]
        graph.initializer.extend([numpy_helper.from_array(np.array([-1, 1], np.int64), f"{base}_column"),
                                  numpy_helper.from_array(np.array([1, width], np.int64), f"{base}_row"),
                                  numpy_helper.from_array(np.array([width], np.int64), f"{base}_width")])
        return [onnx.helper.make_node("Reshape", [node.input[1], f"{base}_column"], [f"{base}_ids"]),
                onnx.helper.make_node("Expand", [f"{base}_ids", f"{base}_row"], [f"{base}_index"]),
                onnx.helper.make_node("GatherElements", [node.input[0], f"{base}_index"], [f"{base}_flat"], axis=0),
                onnx.helper.make_node("Shape", [node.input[1]], [f"{base}_ids_shape"]),
                onnx.helper.make_node("Concat", [f"{base}_ids_shape", f"{base}_width"], [f"{base}_shape"], axis=0),
                onnx.helper.make_node("Reshape", [f"{base}_flat", f"{base}_shape"], [node.output[0]])]

    return _replace_nodes(model, build)


def sums_as_adds(model: onnx.ModelProto) -> int:
    """Each variadic ``Sum(a, b, c…)`` → ``Add(Add(a, b), c)…``, in the same order (bit-identical). Meant for
    the training graph ``generate_artifacts`` writes: ORT's gradient builder sums a tensor's gradient
    contributions with ``Sum``, whose CPU kernel is single-threaded (175 ms of GPT-2 small's step at 2 threads
    and still 175 at 8), where ``Add`` is threaded (1.6–1.8× quicker at 2 threads). Returns how many."""

    def build(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        inputs = [name for name in node.input if name]
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(inputs) < 2:
            return None
        adds, total = [], inputs[0]
        for index, term in enumerate(inputs[1:], start=1):
            out = node.output[0] if index == len(inputs) - 1 else f"{node.output[0]}__sum{index}"
            adds.append(onnx.helper.make_node("Add", [total, term], [out], name=f"{node.name or out}__add{index}"))
            total = out
        return adds

    return _replace_nodes(model, build)


def _drop_nan_guards(model: onnx.ModelProto) -> int:
    """``Where(IsNaN(p), 0, p)`` after attention's softmax only catches rows masked entirely with ``-inf``;
    once masks are finite (``_finite_masks``) no such row exists: read ``p`` directly (two passes fewer
    over the attention matrix each way)."""
    graph = model.graph
    constants = _constants(model)
    producer = {o: n for n in graph.node for o in n.output}
    renames: dict[str, str] = {}
    dead: set[int] = set()
    for node in graph.node:
        if node.op_type != "Where" or len(node.input) != 3:
            continue
        guard = producer.get(node.input[0])
        zero = constants.get(node.input[1])
        if guard is None or guard.op_type != "IsNaN" or guard.input[0] != node.input[2] or zero is None \
                or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
            continue
        if node.output[0] in {o.name for o in graph.output}:
            continue
        renames[node.output[0]] = node.input[2]
        dead.add(id(node))
    if not renames:
        return 0
    nodes = [n for n in graph.node if id(n) not in dead]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    used = {name for n in nodes for name in n.input}
    nodes = [n for n in nodes if not (n.op_type == "IsNaN" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(renames)


def _name_gradient_outputs(model: onnx.ModelProto) -> int:
    """Name the optional outputs the gradient builder reads: ``LayerNormalization``'s Mean and InvStdDev,
    ``Dropout``'s mask (without them it fails at ``gradient_builder_base.h:123 i < OutputDefs().size()``)."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "__mean", node.output[0] + "__inv_std_dev"])
            count += 1
        elif node.op_type == "Dropout" and len(node.output) == 1:
            node.output.append(node.output[0] + "__mask")
            count += 1
    return count


def _has_neg_inf(model: onnx.ModelProto) -> bool:
    """True if a constant the graph holds in memory still contains ``-inf`` (external data is not read)."""
    tensors = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    tensors += [i for i in model.graph.initializer if i.ByteSize() < 1 << 20]
    return any(t.data_type in FLOAT_TYPES and t.data_location == 0 and np.isneginf(numpy_helper.to_array(t)).any()
               for t in tensors)


def _finite_masks(model: onnx.ModelProto) -> int:
    count = 0

    def fix(tensor: onnx.TensorProto) -> bool:
        if tensor.data_type not in FLOAT_TYPES or tensor.data_location != 0:
            return False
        array = numpy_helper.to_array(tensor)
        mask = np.isneginf(array)
        if not mask.any():
            return False
        array = array.copy()
        array[mask] = FINITE_NEG[tensor.data_type]
        tensor.CopyFrom(numpy_helper.from_array(array.astype(array.dtype), tensor.name))
        return True

    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and fix(attribute.t):
                count += 1
            elif attribute.type == onnx.AttributeProto.FLOAT and attribute.f == -math.inf:
                attribute.f = FINITE_NEG[onnx.TensorProto.FLOAT]
                count += 1
    for initializer in model.graph.initializer:
        if initializer.data_type in FLOAT_TYPES and initializer.ByteSize() < 1 << 20 and fix(initializer):
            count += 1
    return count


# --------------------------------------------------------------------------------------------- checks

def check_trainable(model: onnx.ModelProto, trainable: Sequence[str], loss_outputs: Sequence[str],
                    gm: torch.fx.GraphModule | None = None) -> None:
    """Raise ExportError unless every op on a trainable-parameter→loss path has an ORT gradient and every
    trainable parameter reaches ``loss_outputs`` through such ops. The message names each blocking op with
    the module it came from, and each parameter left without a gradient."""
    graph = model.graph
    types = _value_types(model)

    non_float = {o for n in graph.node if n.op_type in _NON_FLOAT_OUTPUT_OPS for o in n.output}
    non_float.update(n.output[0] for n in graph.node if n.op_type == "Cast" and n.output and any(
        a.name == "to" and a.i not in FLOAT_TYPES for a in n.attribute))  # an integer cast carries no gradient

    def is_float(name: str) -> bool:
        value = types.get(name)
        if value is None or not value.HasField("tensor_type") or not value.tensor_type.elem_type:
            return name not in non_float  # unknown type: assume it can carry a gradient unless its op says not
        return value.tensor_type.elem_type in FLOAT_TYPES

    forward = set(trainable)  # tensors that depend on a trainable parameter
    for node in graph.node:
        if any(name in forward for i, name in enumerate(node.input) if i not in NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())):
            forward.update(o for o in node.output if o and is_float(o))
    to_loss = set(loss_outputs)  # tensors the loss depends on differentiably (not through integer tensors)
    for node in reversed(graph.node):
        if any(o in to_loss and is_float(o) for o in node.output):
            to_loss.update(node.input)
    blocking = [n for n in graph.node if n.op_type not in ORT_GRADIENT_OPS
                and any(o in forward and o in to_loss for o in n.output)]
    reached = set(loss_outputs)  # tensors whose gradient ORT can build
    for node in reversed(graph.node):
        if node.op_type not in ORT_GRADIENT_OPS or not any(o in reached for o in node.output):
            continue
        skip = NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())
        reached.update(name for i, name in enumerate(node.input) if i not in skip and is_float(name))
    unreachable = [p for p in trainable if p not in reached]
    if not blocking and not unreachable:
        return
    parts = []
    if blocking:
        ops = {}
        for node in blocking:
            ops.setdefault((node.op_type, _node_where(node, gm)), node.name)
        listed = "; ".join(f"{op} at {where}" for op, where in list(ops)[:8])
        more = f" (+{len(ops) - 8} more)" if len(ops) > 8 else ""
        parts.append(f"{len(blocking)} op(s) without an ONNX Runtime gradient on the parameter→loss path: {listed}{more}")
    if unreachable:
        shown = ", ".join(unreachable[:8]) + (f" (+{len(unreachable) - 8} more)" if len(unreachable) > 8 else "")
        parts.append(f"{len(unreachable)} trainable parameter(s) would get no gradient: {shown}")
    raise ExportError("onnx export: " + "; ".join(parts) + "; rewrite those ops with differentiable ones or "
                      "freeze the parameters (requires_grad=False)")


def _node_where(node: onnx.NodeProto, gm: torch.fx.GraphModule | None = None) -> str:
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
