"""Export a Program to ONNX and to ONNX Runtime training artifacts.

1. Wrap the program's GraphModule in a module that returns only the training objective (the model's own
   loss: ``loss_fn`` or the output's ``loss``) — or, for inference, the output tensors — and export it
   with the dynamo exporter: ``torch.export.export(strict=False)`` of the wrapper, then
   ``torch.onnx.export(..., dynamo=True, optimize=False)``. (The TorchScript exporter stops at
   transformers' ``aten::diff``; ``optimize=True`` folds and renames parameters, so it is not used.)
2. Legalise for ONNX Runtime training 1.19 (``legalize_for_training``):
   a. IR version ≤ 10, default-domain opset ≤ 21 (converted down when newer);
   b. ``SplitToSequence`` + constant-index ``SequenceAt`` → one ``Split`` (ORT cannot differentiate sequences);
   c. ``CastLike`` → ``Cast`` to the known type (no gradient builder for ``CastLike``);
   d. ``LayerNormalization`` gets its ``Mean`` and ``InvStdDev`` outputs (the gradient builder reads them);
   e. ``-inf`` constants → a large finite negative (``-inf`` masks train to NaN in ORT);
   f. every parameter stays a trainable initializer named as in the module (``transformer.h.0.attn.c_attn.weight``);
      tied parameters are one initializer, named by their first module name.
3. Check, before ``generate_artifacts``, that every op on a parameter→loss path has an ORT gradient and that
   every trainable parameter reaches the loss; name the ops (with their module path) and the parameters.
4. ``generate_artifacts`` with ``requires_grad`` = trainable parameters, ``frozen_params`` = the others
   (e.g. the base after ``lora``), ``loss=None`` (the loss is inside the graph) or a built-in loss when the
   program has none, AdamW in PyTorch's mode (``adam_mode=0``) with the hyper-parameters given.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
from onnx import numpy_helper
from torch.utils import _pytree as pytree

from ..errors import EffcompileError
from ..graph import get_attr_value, module_path
from ..program import Program, _loss_field

log = logging.getLogger(__name__)

MANIFEST = "effcompile_onnx.json"
MAX_IR_VERSION = 10
MAX_OPSET = 21
EXPORT_OPSET = 18
PROTOBUF_LIMIT = 2_000_000_000  # bytes; above it ONNX must keep tensors in an external data file
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


class ExportError(EffcompileError):
    """The program cannot be exported to ONNX or trained in ONNX Runtime as it stands."""


@dataclass
class ExportInfo:
    """What an export wrote and how to feed it (saved as ``effcompile_onnx.json`` beside the models)."""

    input_names: list[str]
    output_names: list[str]
    requires_grad: list[str] = field(default_factory=list)
    frozen_params: list[str] = field(default_factory=list)
    unused_params: list[str] = field(default_factory=list)
    loss: str = "model"
    optimizer: dict[str, Any] = field(default_factory=dict)
    exporter: str = "torch.onnx.export(dynamo=True, optimize=False) of torch.export.export(strict=False)"
    opset: int = EXPORT_OPSET
    ir_version: int = MAX_IR_VERSION
    dynamic_batch: bool = False
    legalisation: dict[str, int] = field(default_factory=dict)
    external_data: bool = False


# --------------------------------------------------------------------------------------------- public API

def export_training_artifacts(program: Program, folder: str | Path, lr: float = 1e-3, weight_decay: float = 0.0,
                              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                              loss: str = "auto", opset: int = EXPORT_OPSET) -> dict[str, str]:
    """Write ONNX Runtime training artifacts for ``program`` into ``folder`` (created if missing).

    Files: ``training_model.onnx``, ``eval_model.onnx`` (the loss), ``optimizer_model.onnx`` (AdamW, PyTorch
    semantics: ``lr``, ``betas``, ``eps`` and decoupled ``weight_decay``), ``checkpoint`` (the parameters) and
    ``effcompile_onnx.json`` (input names, trainable/frozen parameters, optimizer settings).
    ``loss``: ``"auto"`` (the model's own loss when it has one, else built-in), ``"model"``,
    ``"cross_entropy"`` (logits ``[..., C]`` against an extra int64 input ``labels``) or ``"mse"`` (against
    an extra input ``target``). Returns the file paths by kind.
    Raises ExportError naming the ops without an ORT gradient and the parameters that cannot be trained.
    """
    from onnxruntime.training import artifacts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loss_kind = _choose_loss(program, loss)
    model, info, names = _export(program, "train" if loss_kind == "model" else "logits")
    trainable, frozen, unused = _partition_parameters(program.gm, model, names)
    stats = legalize_for_training(model)
    info.legalisation = stats
    check_trainable(model, trainable, info.output_names[:1], program.gm)
    info.requires_grad, info.frozen_params, info.unused_params = trainable, frozen, unused
    info.loss = loss_kind
    info.optimizer = {"name": "adamw", "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps,
                      "adam_mode": 0}
    builtin_loss: Any = None
    if loss_kind == "cross_entropy":
        builtin_loss = artifacts.LossType.CrossEntropyLoss
    elif loss_kind == "mse":
        builtin_loss = artifacts.LossType.MSELoss
    optimizer = _adamw_block(betas, eps, weight_decay)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export.") as scratch:
        model_arg: onnx.ModelProto | str = model
        if _initializer_bytes(model) > PROTOBUF_LIMIT:
            info.external_data = True
            path = Path(scratch) / "model.onnx"
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx.data")
            model_arg = str(path)
        try:
            artifacts.generate_artifacts(model_arg, requires_grad=trainable, frozen_params=frozen,
                                         loss=builtin_loss, optimizer=optimizer, artifact_directory=str(folder))
        except Exception as error:  # ORT raises RuntimeError/Fail with C++ text: name what broke
            raise ExportError(f"onnx export: onnxruntime generate_artifacts failed: {_first_line(error)}; "
                              f"{_explain_ort_error(error, model, program.gm)}") from error
    if loss_kind != "model":
        info.input_names = info.input_names + _extra_loss_inputs(folder / "training_model.onnx", info.input_names)
    _set_pytorch_adamw(folder / "optimizer_model.onnx")
    (folder / MANIFEST).write_text(json.dumps(asdict(info), indent=2))
    files = {kind: str(folder / name) for kind, name in (
        ("training_model", "training_model.onnx"), ("eval_model", "eval_model.onnx"),
        ("optimizer_model", "optimizer_model.onnx"), ("checkpoint", "checkpoint"), ("manifest", MANIFEST))}
    log.info("wrote ONNX Runtime training artifacts to %s (%d trainable, %d frozen parameters)", folder,
             len(trainable), len(frozen))
    return files


def export_eval_model(program: Program, folder: str | Path, opset: int = EXPORT_OPSET,
                      filename: str = "eval_model.onnx") -> str:
    """Write an inference-only ONNX model of ``program`` (all output tensors, e.g. loss and logits, in the
    order of the output's pytree leaves) to ``folder/filename`` with every parameter an initializer.
    Returns its path. Raises ExportError when the exporter fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, info, _ = _export(program, "eval")
    info.legalisation = legalize_for_training(model, inference=True)
    path = folder / filename
    if _initializer_bytes(model) > PROTOBUF_LIMIT:
        info.external_data = True
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=filename + ".data")
    else:
        onnx.save(model, str(path))
    manifest = folder / MANIFEST
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    data["inference"] = {"file": filename, "input_names": info.input_names, "output_names": info.output_names}
    manifest.write_text(json.dumps(data, indent=2))
    return str(path)


# --------------------------------------------------------------------------------------------- export

class _Wrapper(torch.nn.Module):
    """Calls the program's GraphModule on flat inputs and returns the loss, the logits, or every tensor."""

    def __init__(self, program: Program, mode: str) -> None:
        super().__init__()
        self.gm = program.gm
        self._mode = mode
        self._loss_fn = program.loss_fn
        self._unflatten = _input_unflattener(program)

    def forward(self, *flat: Any) -> Any:
        args, kwargs = self._unflatten(list(flat))
        output = self.gm(*args, **kwargs)
        if self._mode == "train":
            if self._loss_fn is not None:
                return self._loss_fn(output, *args, **kwargs)
            loss = _loss_field(output)
            if loss is None:
                raise ExportError("onnx export: the model returns no scalar `loss`; give the spec a loss_fn")
            return loss
        leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        if self._mode == "logits":
            floats = [t for t in leaves if t.is_floating_point() and t.dim() >= 1]
            if not floats:
                raise ExportError("onnx export: the model returns no floating-point tensor for a built-in loss")
            return floats[0]
        return tuple(leaves)


def _input_unflattener(program: Program) -> Any:
    if program.capture_path == "export":
        flat, spec = pytree.tree_flatten((program.args, program.kwargs))
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        if len(flat) == len(placeholders):
            return lambda values: pytree.tree_unflatten(values, spec)
    names = list(inspect.signature(program.gm.forward).parameters)
    return lambda values: ((), dict(zip(names, values)))


def _input_names(program: Program) -> list[str]:
    if program.capture_path == "export":
        flat, _ = pytree.tree_flatten_with_path((program.args, program.kwargs))
        names = []
        for path, _ in flat:
            keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", ""))) for k in path]
            names.append("_".join(str(k) for k in keys[1:]) if keys[0] == 1 else f"arg{'_'.join(map(str, keys[1:]))}")
        return [re.sub(r"\W", "_", n) for n in names]
    bound = inspect.signature(program.gm.forward).bind(*program.args, **program.kwargs)
    bound.apply_defaults()
    return list(bound.arguments)


def _export(program: Program, mode: str) -> tuple[onnx.ModelProto, ExportInfo, dict[str, str]]:
    """Export the wrapped program; returns the ONNX model, its ExportInfo and initializer→module names."""
    wrapper = _Wrapper(program, mode)
    wrapper.train(program.gm.training)
    flat = tuple(program.flat_inputs())
    input_names = _input_names(program)
    exported, dynamic = None, False
    dynamic_shapes = tuple({0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None
                           for v in flat)
    for shapes in (dynamic_shapes, None):
        try:
            exported = torch.export.export(wrapper, flat, dynamic_shapes=shapes, strict=False)
            dynamic = shapes is not None
            break
        except Exception as error:  # the batch can be pinned by the graph: export it static
            if shapes is None:
                raise ExportError(f"onnx export: torch.export of the rewritten graph failed: {_first_line(error)}; "
                                  "the graph must be re-traceable (no Python side effects)") from error
            log.info("dynamic-batch re-export failed (%s); exporting static shapes", _first_line(error))
    assert exported is not None
    try:
        onnx_program = torch.onnx.export(exported, flat, dynamo=True, optimize=False, opset_version=EXPORT_OPSET,
                                         verbose=False)
    except Exception as error:
        raise ExportError(f"onnx export: torch.onnx.export failed: {_first_line(error)}; an op has no ONNX "
                          "translation — rewrite it or register a custom translation") from error
    model = onnx_program.model_proto
    _rename_io(model, input_names, mode, program)
    names = _rename_parameters(model, program.gm)
    info = ExportInfo([i.name for i in model.graph.input], [o.name for o in model.graph.output],
                      dynamic_batch=dynamic, opset=_default_opset(model))
    return model, info, names


def _rename_io(model: onnx.ModelProto, input_names: list[str], mode: str, program: Program) -> None:
    renames: dict[str, str] = {}
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    flat_names = [f"flat_{i}" for i in range(len(input_names))]
    by_flat = dict(zip(flat_names, input_names))
    for value in graph_inputs:
        if value.name in by_flat:
            renames[value.name] = by_flat[value.name]
    outputs = list(model.graph.output)
    if mode == "train":
        renames[outputs[0].name] = "loss"
    elif mode == "logits":
        renames[outputs[0].name] = "logits"
    else:
        out_names = _output_names(program)
        for value, name in zip(outputs, out_names):
            renames[value.name] = name
    _rename_values(model.graph, renames)


def _output_names(program: Program) -> list[str]:
    with torch.no_grad():
        output = program.run()
    flat, _ = pytree.tree_flatten_with_path(output)
    names = []
    for i, (path, leaf) in enumerate(flat):
        if not isinstance(leaf, torch.Tensor):
            continue
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", "")))) for k in path]
        name = re.sub(r"\W", "_", "_".join(k for k in keys if k)) or f"output_{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def _rename_parameters(model: onnx.ModelProto, gm: torch.fx.GraphModule) -> dict[str, str]:
    """Name each initializer that holds a module parameter after the parameter (first name of a tied one).
    Returns {new initializer name: module parameter name} for parameters only."""
    canonical: dict[int, str] = {}
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(parameter), name)
    renames: dict[str, str] = {}
    parameters: dict[str, str] = {}
    for initializer in model.graph.initializer:
        original = initializer.name
        target = original[3:] if original.startswith("gm.") else original
        try:
            value = get_attr_value(gm, target)
        except AttributeError:
            continue
        if isinstance(value, torch.nn.Parameter) and id(value) in canonical:
            new = canonical[id(value)]
            renames[original] = new
            parameters[new] = new
        elif original.startswith("gm."):
            renames[original] = target
    _rename_values(model.graph, renames)
    return parameters


def _rename_values(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    if not renames:
        return
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in collection:
            if item.name in renames:
                item.name = renames[item.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]


def _partition_parameters(gm: torch.fx.GraphModule, model: onnx.ModelProto,
                          names: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Split the module's parameters into (trainable, frozen) initializers and those the graph never uses."""
    in_graph = {i.name for i in model.graph.initializer}
    trainable, frozen, unused, seen = [], [], [], set()
    for name, parameter in gm.named_parameters():  # remove_duplicate: a tied parameter once, first name
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if name not in in_graph:
            unused.append(name)
        elif parameter.requires_grad:
            trainable.append(name)
        else:
            frozen.append(name)
    missing = [n for n in names if n not in trainable + frozen]
    if missing:
        log.debug("initializers named after parameters but not partitioned: %s", missing)
    if not trainable:
        raise ExportError("onnx export: no trainable parameter reaches the graph; ORT training needs at least "
                          "one (after lora, check that adapters were added)")
    return trainable, frozen, unused


def _choose_loss(program: Program, loss: str) -> str:
    choices = ("auto", "model", "cross_entropy", "mse")
    if loss not in choices:
        raise ExportError(f"onnx export: loss {loss!r} is not one of {', '.join(choices)}")
    if loss != "auto":
        return loss
    if program.has_loss():
        return "model"
    flat = program.flat_inputs()
    integer_input = any(isinstance(v, torch.Tensor) and not v.is_floating_point() for v in flat)
    return "cross_entropy" if integer_input else "mse"


# --------------------------------------------------------------------------------------------- legalisation

def legalize_for_training(model: onnx.ModelProto, inference: bool = False) -> dict[str, int]:
    """Rewrite ``model`` in place so ONNX Runtime 1.19 can train it (see the module docstring, step 2).
    Returns counts of each fix. Raises ExportError when a sequence op cannot be turned into ``Split``."""
    stats = {"ir_version_lowered": 0, "opset_converted": 0, "split_from_sequence": 0, "castlike_to_cast": 0,
             "layernorm_outputs_added": 0, "neg_inf_constants": 0}
    if _default_opset(model) > MAX_OPSET:
        converted = onnx.version_converter.convert_version(model, MAX_OPSET)
        model.CopyFrom(converted)
        stats["opset_converted"] = 1
    _infer_types(model)
    stats["split_from_sequence"] = _sequences_to_split(model)
    stats["castlike_to_cast"] = _castlike_to_cast(model)
    if not inference:
        stats["layernorm_outputs_added"] = _layernorm_outputs(model)
    stats["neg_inf_constants"] = _finite_masks(model)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        stats["ir_version_lowered"] = 1
    return stats


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _infer_types(model: onnx.ModelProto) -> None:
    if model.ByteSize() > PROTOBUF_LIMIT:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
    except Exception as error:  # shapes are a help here, not a need
        log.debug("ONNX shape inference failed: %s", error)


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


def _layernorm_outputs(model: onnx.ModelProto) -> int:
    count = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "__mean", node.output[0] + "__inv_std_dev"])
            count += 1
    return count


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

    def is_float(name: str) -> bool:
        value = types.get(name)
        if value is None or not value.HasField("tensor_type"):
            return True  # unknown: assume it can carry a gradient
        return value.tensor_type.elem_type in FLOAT_TYPES

    forward = set(trainable)  # tensors that depend on a trainable parameter
    for node in graph.node:
        if any(name in forward for i, name in enumerate(node.input) if i not in NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())):
            forward.update(o for o in node.output if o and is_float(o))
    to_loss = set(loss_outputs)  # tensors the loss depends on
    for node in reversed(graph.node):
        if any(o in to_loss for o in node.output):
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
    path = ""
    if gm is not None and fx_name is not None:
        for fx_node in gm.graph.nodes:
            if fx_node.name == fx_name:
                path = module_path(fx_node)
                break
    if not path:
        path = meta.get("namespace", "").split(":")[-1].strip() or "?"
    return f"{path or '<root>'} (node {fx_name or node.name})"


def _explain_ort_error(error: Exception, model: onnx.ModelProto, gm: torch.fx.GraphModule) -> str:
    text = str(error)
    match = re.search(r"not registered:\s*(\w+)(?: for node (\S+))?", text)
    if match:
        op, node_name = match.group(1), match.group(2)
        node = next((n for n in model.graph.node if n.name == node_name or n.op_type == op), None)
        where = _node_where(node, gm) if node is not None else "?"
        return f"op {op} at {where} has no gradient in ONNX Runtime; rewrite it with differentiable ops"
    if "unreachable" in text:
        return "a parameter cannot reach the loss; check the ops between it and the loss"
    return "see the ONNX Runtime message above"


# --------------------------------------------------------------------------------------------- helpers

def _adamw_block(betas: tuple[float, float], eps: float, weight_decay: float) -> Any:
    from onnxruntime.training import onnxblock

    return onnxblock.optim.AdamW(bias_correction=True, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _set_pytorch_adamw(path: Path) -> None:
    """onnxblock writes AdamW in Hugging Face mode (``adam_mode=1``: eps before bias correction, decay after
    the update); PyTorch's ``torch.optim.AdamW`` is ``adam_mode=0``."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attribute in node.attribute:
                if attribute.name == "adam_mode":
                    attribute.i = 0
    onnx.save(model, str(path))


def _extra_loss_inputs(path: Path, known: list[str]) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in known and i.name not in initializers]


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for initializer in model.graph.initializer:
        count = int(np.prod(initializer.dims)) if initializer.dims else 1
        total += count * onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type).itemsize
    return total


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
