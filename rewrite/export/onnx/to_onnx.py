"""From a Program to an ONNX model (steps 1 and 4 of ``effcompile.export.onnx.exporter``'s recipe): wrap
the GraphModule so it returns the loss, the logits or every output tensor, export it with the dynamo
exporter, name inputs, outputs and parameters after the program's, and split the parameters into
trainable, frozen and unused."""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from ...data_branches import data_branch_checks
from ...errors import ExportError
from ...graph import get_attr_value, module_path, op_name
from ...patterns import TRANSPOSE_OPS, VIEW_OPS
from ...program import Program, loss_field
from .failures import describe_export_failure, strip_ansi
from .helpers import default_opset, first_line
from .legalize import MAX_IR_VERSION

log = logging.getLogger(__name__)

EXPORT_OPSET = 18


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


class _Wrapper(torch.nn.Module):
    """Calls the program's GraphModule on flat inputs and returns the loss, the logits, or every tensor."""

    def __init__(self, program: Program, mode: str) -> None:
        super().__init__()
        self.gm = program.gm
        self._mode = mode
        self._loss_fn = program.loss_fn
        self._unflatten = _input_unflattener(program)

    def forward(self, *flat: Any) -> Any:
        args, kwargs, loss_args, loss_kwargs = self._unflatten(list(flat))
        output = self.gm(*args, **kwargs)
        if self._mode == "train":
            if self._loss_fn is not None:  # as ``Program.objective`` calls it: the spec's own (args, kwargs)
                return self._loss_fn(output, *loss_args, **loss_kwargs)
            loss = loss_field(output)
            if loss is None:
                raise ExportError("onnx export: the model returns no scalar `loss`; give the spec a loss_fn")
            return loss
        leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        if self._mode in ("logits", "logits2d"):
            floats = [t for t in leaves if t.is_floating_point() and t.dim() >= 1]
            if not floats:
                raise ExportError("onnx export: the model returns no floating-point tensor for a built-in loss")
            # ORT's cross-entropy takes scores [N, C]: fold the batch and sequence dimensions together.
            return floats[0].reshape(-1, floats[0].shape[-1]) if self._mode == "logits2d" else floats[0]
        return tuple(leaves)


def _input_unflattener(program: Program) -> Any:
    """A function from the flat inputs (``Program.flat_inputs``' order) to ``(gm args, gm kwargs, loss_fn args,
    loss_fn kwargs)``: the GraphModule gets its placeholders, ``loss_fn`` the structure of the spec's own
    ``(args, kwargs)`` — never the forward's unused defaults as keywords."""
    if program.capture_path == "export":
        flat, spec = pytree.tree_flatten((program.args, program.kwargs))
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        if len(flat) == len(placeholders):
            def unflatten_export(values: list[Any]) -> tuple[Any, ...]:
                args, kwargs = pytree.tree_unflatten(values, spec)
                return args, kwargs, args, kwargs
            return unflatten_export
    signature = inspect.signature(program.gm.forward)
    names = list(signature.parameters)
    bound = signature.bind(*program.args, **program.kwargs).arguments  # the spec's names, in its order
    positional = [name for name in bound if name not in program.kwargs]

    def unflatten_named(values: list[Any]) -> tuple[Any, ...]:
        by_name = dict(zip(names, values))
        return ((), by_name, tuple(by_name[n] for n in positional), {k: by_name[k] for k in program.kwargs})
    return unflatten_named


def _copy_before_strided_views(gm: torch.fx.GraphModule) -> int:
    """Give every ``view``/``reshape`` of a transposed/permuted tensor a contiguous copy as its input. Returns
    how many.

    A ``transpose → reshape`` traced where the tensor happened to be contiguous (T5's attention output after
    the fused SDPA kernel) is decomposed into a ``view`` by the ONNX exporter's decomposition step, which
    re-runs the graph with SDPA decomposed to its math — whose output has another layout, so the ``view``
    fails ("Cannot view a tensor with shape … and strides …"); the same step drops a ``contiguous()`` it judges
    a no-op, so each becomes an explicit contiguous ``clone``. The copies are ``Identity`` nodes in ONNX."""
    contiguous = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.contiguous.default
                  and len(n.args) == 1]
    for node in contiguous:  # an explicit copy: the decomposition drops a contiguous() it judges a no-op
        node.target, node.kwargs = torch.ops.aten.clone.default, {"memory_format": torch.contiguous_format}
    views = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in VIEW_OPS
             and isinstance(n.args[0], torch.fx.Node) and n.args[0].target in TRANSPOSE_OPS]
    for view in views:
        with gm.graph.inserting_before(view):
            copy = gm.graph.call_function(torch.ops.aten.clone.default, (view.args[0],),
                                          {"memory_format": torch.contiguous_format})
        copy.meta.update({k: v for k, v in view.args[0].meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        view.replace_input_with(view.args[0], copy)
    if views or contiguous:
        gm.recompile()
    return len(views) + len(contiguous)


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


_COMPLEX_OPS = {"view_as_complex", "view_as_real", "polar", "complex"}


def _refuse_complex(program: Program) -> None:
    """Raise ExportError naming the first op on complex numbers (ONNX has no complex tensors), e.g. Llama 4's
    rotary embedding, rather than the exporter's generic conversion failure."""
    for node in program.gm.graph.nodes:
        name = op_name(node)
        if node.op == "call_function" and name in _COMPLEX_OPS:
            where = module_path(node) or node.name
            raise ExportError(f"onnx export: {name} at {where} computes with complex numbers, which ONNX cannot "
                              "represent; rewrite that code with real tensors (e.g. rotary embeddings as cos/sin "
                              "products) before exporting")


def _refuse_data_branches(program: Program) -> None:
    """Raise ExportError when the graph was captured specialised on its example's data: its runtime assertions
    (``aten._assert_scalar``) are what refuse inputs that branch otherwise, and ONNX has no such check, so the
    exported model would silently compute the example's branch for every input."""
    checks = data_branch_checks(program.gm)
    if checks:
        where = "; ".join(program.meta.get("data_branches") or ()) or checks[0]
        raise ExportError(f"onnx export: {program.name} was captured specialised on its example's data ({where}) "
                          "and ONNX has no runtime check to refuse inputs that branch otherwise, so the exported "
                          "model could compute the wrong branch; make that branch tensor-only (torch.where) or "
                          "train the PyTorch module instead (the output folder's module/)")


def export_program(program: Program, mode: str, opset: int = EXPORT_OPSET) -> tuple[onnx.ModelProto, ExportInfo, dict[str, str]]:
    """Export the wrapped program; returns the ONNX model, its ExportInfo and initializer→module names."""
    _refuse_complex(program)
    _refuse_data_branches(program)
    wrapper = _Wrapper(program, mode)
    wrapper.train(program.gm.training)
    flat = tuple(program.flat_inputs())
    input_names = _input_names(program)
    dynamic_shapes = tuple({0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None
                           for v in flat)
    onnx_program, dynamic = None, False
    for shapes in (dynamic_shapes, None):  # a dynamic batch where both exporters follow it, else static
        stage = "torch.export of the rewritten graph"
        try:
            # forward(*flat): the varargs tuple is one argument, so its shapes go in a 1-tuple
            exported = torch.export.export(wrapper, flat, dynamic_shapes=None if shapes is None else (shapes,),
                                           strict=False)
            _copy_before_strided_views(exported.graph_module)
            stage = "torch.onnx.export"
            onnx_program = torch.onnx.export(exported, flat, dynamo=True, optimize=False,
                                             opset_version=opset, verbose=False)
            dynamic = shapes is not None
            break
        except Exception as error:
            if shapes is not None:
                log.info("dynamic-batch export failed in %s (%s); exporting static shapes", stage, first_line(error))
                continue
            if stage.startswith("torch.export"):
                message = f"{strip_ansi(first_line(error))}; the graph must be re-traceable (no Python side effects)"
            else:
                message = describe_export_failure(error, program.gm)
            raise ExportError(f"onnx export: {stage} failed: {message}") from error
    assert onnx_program is not None
    model = onnx_program.model_proto
    _rename_io(model, input_names, mode, program)
    names = _rename_parameters(model, program.gm)
    info = ExportInfo([i.name for i in model.graph.input], [o.name for o in model.graph.output],
                      dynamic_batch=dynamic, opset=default_opset(model))
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
    elif mode in ("logits", "logits2d"):
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
    """Name each initializer that holds a module parameter after the parameter (first name of a tied one, in
    the order the trainable/frozen partition walks ``gm.named_parameters``). Returns {new initializer name:
    module parameter name} for parameters only."""
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


def partition_parameters(gm: torch.fx.GraphModule, model: onnx.ModelProto,
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


def choose_loss(program: Program, loss: str) -> str:
    """The loss to train: ``loss`` if given, else the model's own (``model``) when it has one,
    ``cross_entropy`` when an input is integer (token ids), ``mse`` otherwise. Raises ExportError for an
    unknown kind."""
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
