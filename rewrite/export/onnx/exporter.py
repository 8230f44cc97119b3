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
   e'. speed (``speed_rewrites``, exact up to float32 round-off): GPT-2's tanh GELU written as
       ``x·sigmoid(x·(c₁ + c₂x²))`` (ORT's fused ``FastGelu`` gradient is slow on CPU); ``SoftmaxCrossEntropyLoss``
       split into ``GatherElements − logsumexp``, the log-sum-exp in threaded elementwise ops (the fused op's and
       ``ReduceLogSumExp``'s CPU kernels are slow over a large vocabulary); float32 ``LayerNormalization``
       decomposed into elementwise ops and reductions (its CPU gradient kernel is single-threaded); embedding
       lookups (``Gather`` of a 2-D initializer) as ``GatherElements`` (its gradient kernel is 4× quicker);
       attention's NaN guard ``Where(IsNaN(p), 0, p)`` dropped once no ``-inf`` is left;
   f. every parameter stays a trainable initializer named as in the module (``transformer.h.0.attn.c_attn.weight``);
      tied parameters are one initializer, named by their first module name;
   g. on a CPU-only ONNX Runtime (no bf16/fp16 MatMul kernels), ops on bf16/fp16 tensors (after ``amp``) run
      in float32 between casts, so the low-precision rounding at op boundaries is kept.
3. Check, before ``generate_artifacts``, that every op on a parameter→loss path has an ORT gradient and that
   every trainable parameter reaches the loss; name the ops (with their module path) and the parameters.
4. ``generate_artifacts`` with ``requires_grad`` = trainable parameters, ``frozen_params`` = the others
   (e.g. the base after ``lora``), ``loss=None`` (the loss is inside the graph) or a built-in loss when the
   program has none, AdamW in PyTorch's mode (``adam_mode=0``) with the hyper-parameters given; then (speed)
   the training graph's gradient ``Sum`` nodes become chains of threaded ``Add`` (``SumsAsAdds``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from ...errors import ExportError
from ...graph import get_attr_value, module_path, op_name
from ...program import Program, loss_field
from .check import check_trainable
from .helpers import default_opset, node_where
from .legalize import MAX_IR_VERSION, SumsAsAdds, legalize_for_training

log = logging.getLogger(__name__)
aten = torch.ops.aten

MANIFEST = "effcompile_onnx.json"
INFERENCE_BESIDE_ARTIFACTS = "inference_model.onnx"  # the inference model's name when training artifacts share the folder
EXPORT_OPSET = 18
PROTOBUF_LIMIT = 2_000_000_000  # bytes; above it ONNX must keep tensors in an external data file
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
                              loss: str = "auto", opset: int = EXPORT_OPSET,
                              low_precision_in_float32: bool | None = None,
                              speed_rewrites: bool = True) -> dict[str, str]:
    """Write ONNX Runtime training artifacts for ``program`` into ``folder`` (created if missing).

    Files: ``training_model.onnx``, ``eval_model.onnx`` (the loss), ``optimizer_model.onnx`` (AdamW, PyTorch
    semantics: ``lr``, ``betas``, ``eps`` and decoupled ``weight_decay``), ``checkpoint`` (the parameters) and
    ``effcompile_onnx.json`` (input names, trainable/frozen parameters, optimizer settings).
    ``opset``: the ONNX opset to export (18; ≤ 21 for ORT 1.19). ``loss``: ``"auto"`` (the model's own loss when it has one, else built-in), ``"model"``,
    ``"cross_entropy"`` (logits ``[..., C]`` against an extra int64 input ``labels``) or ``"mse"`` (against
    an extra input ``target``). ``low_precision_in_float32`` (default: when the installed ONNX Runtime is
    CPU-only, whose kernels lack bf16/fp16 math) runs ops on bf16/fp16 tensors (after ``amp``) in float32
    between casts. ``speed_rewrites``: rewrite GPT-2's tanh GELU and the cross-entropy into ops ORT's CPU
    kernels run faster, drop attention's NaN guard (exact up to float32 round-off). Returns the file paths by kind.
    Raises ExportError naming the ops without an ORT gradient and the parameters that cannot be trained.
    """
    folder = Path(folder)
    with _removed_on_failure(folder):
        return _export_training_artifacts(program, folder, lr, weight_decay, betas, eps, loss, opset,
                                          low_precision_in_float32, speed_rewrites)


@contextlib.contextmanager
def _removed_on_failure(folder: Path) -> Any:
    """Create ``folder`` if missing; if the block fails and the folder was new, remove it (no partial output;
    a folder that existed before is left as it was found, less what the failed export wrote into it)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _export_training_artifacts(program: Program, folder: Path, lr: float, weight_decay: float,
                               betas: tuple[float, float], eps: float, loss: str, opset: int,
                               low_precision_in_float32: bool | None, speed_rewrites: bool) -> dict[str, str]:
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    inference = _keep_inference_model(folder)
    loss_kind = _choose_loss(program, loss)
    model, info, names = _export(program, {"model": "train", "cross_entropy": "logits2d"}.get(loss_kind, "logits"),
                                 opset)
    trainable, frozen, unused = _partition_parameters(program.gm, model, names)
    if low_precision_in_float32 is None:
        low_precision_in_float32 = _cpu_only_ort()
    info.legalisation = legalize_for_training(model, low_precision_in_float32=low_precision_in_float32,
                                              speed_rewrites=speed_rewrites)
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
            _generate_artifacts_guarded(model_arg, requires_grad=trainable, frozen_params=frozen,
                                        loss=builtin_loss, optimizer=optimizer, artifact_directory=str(folder))
        except Exception as error:  # ORT raises RuntimeError/Fail with C++ text: name what broke
            raise ExportError(f"onnx export: onnxruntime generate_artifacts failed: {_first_line(error)}; "
                              f"{_explain_ort_error(error, model, program.gm)}") from error
    if loss_kind != "model":  # the built-in loss adds its target input (``labels`` / ``target``)
        info.input_names = _user_inputs(folder / "training_model.onnx", trainable + frozen)
    _rewrite_saved(folder / "optimizer_model.onnx", _pytorch_adamw)
    if speed_rewrites:
        info.legalisation[SumsAsAdds.name] = _rewrite_saved(folder / "training_model.onnx", SumsAsAdds().call)
    manifest = asdict(info)
    if inference is not None:
        manifest["inference"] = inference
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
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
    with _removed_on_failure(folder):
        return _export_eval_model(program, folder, opset, filename)


def _export_eval_model(program: Program, folder: Path, opset: int, filename: str) -> str:
    if filename == "eval_model.onnx" and (folder / "training_model.onnx").exists():
        filename = INFERENCE_BESIDE_ARTIFACTS  # the artifacts' eval_model.onnx (the loss) stays theirs
    model, info, _ = _export(program, "eval", opset)
    info.legalisation = legalize_for_training(model, inference=True, low_precision_in_float32=_cpu_only_ort())
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


def _keep_inference_model(folder: Path) -> dict[str, Any] | None:
    """``generate_artifacts`` writes ``eval_model.onnx`` (the loss): move an inference model written there
    before (``--export onnx-eval``) out of its way. Returns the manifest's inference entry, if any."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    inference = json.loads(manifest.read_text()).get("inference")
    if inference and inference.get("file") == "eval_model.onnx" and (folder / "eval_model.onnx").exists():
        (folder / "eval_model.onnx").replace(folder / INFERENCE_BESIDE_ARTIFACTS)
        inference["file"] = INFERENCE_BESIDE_ARTIFACTS
    return inference


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


def _export(program: Program, mode: str, opset: int = EXPORT_OPSET) -> tuple[onnx.ModelProto, ExportInfo, dict[str, str]]:
    """Export the wrapped program; returns the ONNX model, its ExportInfo and initializer→module names."""
    _refuse_complex(program)
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
            stage = "torch.onnx.export"
            onnx_program = torch.onnx.export(exported, flat, dynamo=True, optimize=False,
                                             opset_version=opset, verbose=False)
            dynamic = shapes is not None
            break
        except Exception as error:
            if shapes is not None:
                log.info("dynamic-batch export failed in %s (%s); exporting static shapes", stage, _first_line(error))
                continue
            hint = ("the graph must be re-traceable (no Python side effects)" if stage.startswith("torch.export")
                    else "an op has no ONNX translation — rewrite it or register a custom translation")
            raise ExportError(f"onnx export: {stage} failed: {_first_line(error)}; {hint}") from error
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


def _explain_ort_error(error: Exception, model: onnx.ModelProto, gm: torch.fx.GraphModule) -> str:
    text = str(error)
    match = re.search(r"not registered:\s*(\w+)(?: for node (\S+))?", text)
    if match:
        op, node_name = match.group(1), match.group(2)
        node = next((n for n in model.graph.node if n.name == node_name or n.op_type == op), None)
        where = node_where(node, gm) if node is not None else "?"
        return f"op {op} at {where} has no gradient in ONNX Runtime; rewrite it with differentiable ops"
    if "unreachable" in text:
        return "a parameter cannot reach the loss; check the ops between it and the loss"
    if "crashed" in text:
        return ("a bug in ONNX Runtime's gradient builder on this graph: export without the pass that made the "
                "failing ops, or with speed_rewrites=False")
    return "rerun with --debug for ONNX Runtime's log"


# --------------------------------------------------------------------------------------------- helpers

def _adamw_block(betas: tuple[float, float], eps: float, weight_decay: float) -> Any:
    from onnxruntime.training import onnxblock

    return onnxblock.optim.AdamW(bias_correction=True, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _pytorch_adamw(model: onnx.ModelProto) -> int:
    """onnxblock writes AdamW in Hugging Face mode (``adam_mode=1``: eps before bias correction, decay after
    the update); PyTorch's ``torch.optim.AdamW`` is ``adam_mode=0``. Returns how many attributes changed."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attribute in node.attribute:
                if attribute.name == "adam_mode" and attribute.i != 0:
                    attribute.i = 0
                    count += 1
    return count


def _rewrite_saved(path: Path, rewrite: Any) -> int:
    """Apply ``rewrite(model) -> count`` to the saved model at ``path`` (its external data, if any, stays
    where it is) and save it back when it changed something. Returns the count."""
    model = onnx.load(str(path), load_external_data=False)
    count = rewrite(model)
    if count:
        onnx.save(model, str(path))
    return count


def _user_inputs(path: Path, parameters: list[str]) -> list[str]:
    """The training model's data inputs in ORT's order (not parameters, gradient buffers or flags)."""
    model = onnx.load(str(path), load_external_data=False)
    skip = set(parameters) | {"lazy_reset_grad"} | {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in skip and not i.name.endswith("accumulation.buffer")]


def _cpu_only_ort() -> bool:
    """True when the installed ONNX Runtime (or none) runs on CPU only: its kernels lack bf16/fp16 math."""
    try:
        import onnxruntime
    except ImportError:
        return True
    return onnxruntime.get_device() == "CPU"


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for initializer in model.graph.initializer:
        count = int(np.prod(initializer.dims)) if initializer.dims else 1
        total += count * onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type).itemsize
    return total


def _generate_artifacts_guarded(model: onnx.ModelProto | str, **kwargs: Any) -> None:
    """``onnxruntime.training.artifacts.generate_artifacts(model, **kwargs)`` in a forked child process (where
    the platform forks), with native stderr quieted: a crash inside ORT's gradient builder or its graph
    transformers (a segfault, as ``FastGeluFusion`` gave on Phi after ``amp``) then raises RuntimeError here,
    naming the signal, instead of killing the caller; a Python error in the child is raised again here."""
    import multiprocessing

    from onnxruntime.training import artifacts

    if "fork" not in multiprocessing.get_all_start_methods():
        with _quiet_native_stderr():  # the gradient builder logs every graph transformer at INFO level
            artifacts.generate_artifacts(model, **kwargs)
        return
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def child() -> None:
        try:
            with _quiet_native_stderr():
                artifacts.generate_artifacts(model, **kwargs)
            writer.send(None)
        except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
            writer.send(f"{type(error).__name__}: {error}")
        finally:
            writer.close()

    process = context.Process(target=child, daemon=True)
    process.start()
    writer.close()
    try:
        message, finished = reader.recv(), True  # None: done; text: the child's error
    except EOFError:  # the child died before it could answer
        message, finished = None, False
    process.join()
    reader.close()
    if message is not None:
        raise RuntimeError(message)
    if not finished or process.exitcode != 0:
        code = process.exitcode or 0
        what = f"signal {-code}" if code < 0 else f"exit status {code}"
        raise RuntimeError(f"onnxruntime crashed ({what}) while building the training graph")


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send what native code writes to stderr (fd 2) to the debug log instead of the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text:
                log.debug("onnxruntime: %s", text[-4000:])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if "[ONNXRuntimeError]" in text:  # drop the C++ source location and signature before ORT's message
        text = "ONNXRuntimeError" + text.split("[ONNXRuntimeError]", 1)[1]
    lines = text.splitlines()
    return lines[0][:400] if lines else type(error).__name__
