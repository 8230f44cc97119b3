"""Export a Program to ONNX and to ONNX Runtime training artifacts. Step 1 lives in ``to_onnx``, step 2 in
``legalize/`` (one named rewrite per module), step 3 in ``check``, step 4 in ``ort_artifacts``.

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
import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from ...errors import ExportError
from ...program import Program
from .check import check_trainable
from .helpers import first_line
from .legalize import SumsAsAdds, legalize_for_training
from .ort_artifacts import (
    adamw_block,
    cpu_only_ort,
    explain_ort_error,
    generate_artifacts_guarded,
    initializer_bytes,
    pytorch_adamw,
    rewrite_saved,
    user_inputs,
)
from .to_onnx import EXPORT_OPSET, ExportInfo, choose_loss, export_program, partition_parameters

log = logging.getLogger(__name__)

MANIFEST = "effcompile_onnx.json"
INFERENCE_BESIDE_ARTIFACTS = "inference_model.onnx"  # the inference model's name when training artifacts share the folder
PROTOBUF_LIMIT = 2_000_000_000  # bytes; above it ONNX must keep tensors in an external data file


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
    loss_kind = choose_loss(program, loss)
    mode = {"model": "train", "cross_entropy": "logits2d"}.get(loss_kind, "logits")
    model, info, names = export_program(program, mode, opset)
    trainable, frozen, unused = partition_parameters(program.gm, model, names)
    if low_precision_in_float32 is None:
        low_precision_in_float32 = cpu_only_ort()
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
    optimizer = adamw_block(betas, eps, weight_decay)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export.") as scratch:
        model_arg: onnx.ModelProto | str = model
        if initializer_bytes(model) > PROTOBUF_LIMIT:
            info.external_data = True
            path = Path(scratch) / "model.onnx"
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx.data")
            model_arg = str(path)
        try:
            generate_artifacts_guarded(model_arg, requires_grad=trainable, frozen_params=frozen,
                                       loss=builtin_loss, optimizer=optimizer, artifact_directory=str(folder))
        except Exception as error:  # ORT raises RuntimeError/Fail with C++ text: name what broke
            raise ExportError(f"onnx export: onnxruntime generate_artifacts failed: {first_line(error)}; "
                              f"{explain_ort_error(error, model, program.gm)}") from error
    if loss_kind != "model":  # the built-in loss adds its target input (``labels`` / ``target``)
        info.input_names = user_inputs(folder / "training_model.onnx", trainable + frozen)
    rewrite_saved(folder / "optimizer_model.onnx", pytorch_adamw)
    if speed_rewrites:
        info.legalisation[SumsAsAdds.name] = rewrite_saved(folder / "training_model.onnx", SumsAsAdds().call)
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
    model, info, _ = export_program(program, "eval", opset)
    info.legalisation = legalize_for_training(model, inference=True, low_precision_in_float32=cpu_only_ort())
    path = folder / filename
    if initializer_bytes(model) > PROTOBUF_LIMIT:
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


__all__ = ["EXPORT_OPSET", "MANIFEST", "ExportInfo", "export_eval_model", "export_training_artifacts"]
