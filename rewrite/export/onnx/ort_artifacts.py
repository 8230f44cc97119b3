"""ONNX Runtime's side of the export: ``generate_artifacts`` run in a forked child (a native crash becomes an
error, not a dead process), the AdamW block in PyTorch's mode, rewrites of the saved artifacts, and what
ORT's errors mean."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.fx

from .helpers import node_where

log = logging.getLogger(__name__)


def explain_ort_error(error: Exception, model: onnx.ModelProto, gm: torch.fx.GraphModule) -> str:
    """What an ONNX Runtime error from ``generate_artifacts`` means and what to do about it (the op and
    module a missing gradient belongs to, an unreachable parameter, a crash)."""
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


def adamw_block(betas: tuple[float, float], eps: float, weight_decay: float) -> Any:
    """onnxblock's AdamW with bias correction and the given hyper-parameters."""
    from onnxruntime.training import onnxblock

    return onnxblock.optim.AdamW(bias_correction=True, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def pytorch_adamw(model: onnx.ModelProto) -> int:
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


def rewrite_saved(path: Path, rewrite: Callable[[onnx.ModelProto], int]) -> int:
    """Apply ``rewrite(model) -> count`` to the saved model at ``path`` (its external data, if any, stays
    where it is) and save it back when it changed something. Returns the count."""
    model = onnx.load(str(path), load_external_data=False)
    count = rewrite(model)
    if count:
        onnx.save(model, str(path))
    return count


def user_inputs(path: Path, parameters: list[str]) -> list[str]:
    """The training model's data inputs in ORT's order (not parameters, gradient buffers or flags)."""
    model = onnx.load(str(path), load_external_data=False)
    skip = set(parameters) | {"lazy_reset_grad"} | {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in skip and not i.name.endswith("accumulation.buffer")]


def cpu_only_ort() -> bool:
    """True when the installed ONNX Runtime (or none) runs on CPU only: its kernels lack bf16/fp16 math."""
    try:
        import onnxruntime
    except ImportError:
        return True
    return onnxruntime.get_device() == "CPU"


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (external data included, by their declared shapes)."""
    total = 0
    for initializer in model.graph.initializer:
        count = int(np.prod(initializer.dims)) if initializer.dims else 1
        total += count * onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type).itemsize
    return total


def generate_artifacts_guarded(model: onnx.ModelProto | str, **kwargs: Any) -> None:
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
