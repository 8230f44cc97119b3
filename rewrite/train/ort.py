"""Train on ONNX Runtime training artifacts (``export_training_artifacts``'s folder) with
``onnxruntime.training.api``: CheckpointState, Module, Optimizer.

    trainer = OrtTrainer("out/onnx")
    loss = trainer.step({"input_ids": ids, "labels": ids})   # forward, backward, AdamW update
    trainer.save_checkpoint("out/onnx/step_100.ckpt")
    trainer = load_trainer("out/onnx", "out/onnx/step_100.ckpt")   # resume (parameters + AdamW moments)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..export.onnx import MANIFEST

Inputs = Mapping[str, Any] | Sequence[Any] | Any


class OrtTrainer:
    """An ONNX Runtime training session over an artifacts folder.

    ``folder``: holds ``training_model.onnx``, ``eval_model.onnx``, ``optimizer_model.onnx``, ``checkpoint``
    and ``effcompile_onnx.json``. ``checkpoint``: a checkpoint file to start from instead (resuming).
    ``lr``: overrides the learning rate written at export. ``device``: ``"cpu"`` or ``"cuda"``.
    ``threads``: ONNX Runtime intra-op threads (default: its own choice, all cores).
    """

    def __init__(self, folder: str | Path, checkpoint: str | Path | None = None, lr: float | None = None,
                 device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        onnxruntime.set_default_logger_severity(3)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)

        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.exists():
            raise ExportError(f"{self.folder} has no {MANIFEST}; export it with effcompile --export onnx")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        self.input_names: list[str] = list(self.manifest["input_names"])
        state_path = Path(checkpoint) if checkpoint is not None else self.folder / "checkpoint"
        self.state = CheckpointState.load_checkpoint(str(state_path))
        self.module = Module(str(self.folder / "training_model.onnx"), self.state,
                             str(self.folder / "eval_model.onnx"), device=device, session_options=options)
        self.optimizer = Optimizer(str(self.folder / "optimizer_model.onnx"), self.module)
        self.lr = float(lr if lr is not None else self.manifest.get("optimizer", {}).get("lr", 1e-3))
        self.optimizer.set_learning_rate(self.lr)
        self.steps_done = int(self.state.properties["effcompile_step"]) \
            if "effcompile_step" in self.state.properties else 0
        self.last_step_seconds = 0.0

    def feeds(self, inputs: Inputs) -> list[np.ndarray]:
        """The graph inputs in order, as numpy arrays, from a dict keyed by input name (``input_ids``,
        ``labels``), a sequence in the graph's order, or one array/tensor."""
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise ExportError(f"ORT training needs inputs {self.input_names}; missing {missing}")
            values = [inputs[n] for n in self.input_names]
        elif isinstance(inputs, (list, tuple)):
            values = list(inputs)
        else:
            values = [inputs]
        if len(values) != len(self.input_names):
            raise ExportError(f"ORT training takes {len(self.input_names)} inputs {self.input_names}, got {len(values)}")
        return [_to_numpy(v) for v in values]

    def step(self, inputs: Inputs) -> float:
        """One training step (forward, backward, AdamW update, gradients reset). Returns the loss; the wall
        time in seconds is in ``last_step_seconds``."""
        feeds = self.feeds(inputs)
        start = time.perf_counter()
        self.module.train()
        loss = self.module(*feeds)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self.last_step_seconds = time.perf_counter() - start
        self.steps_done += 1
        return float(np.asarray(loss[0] if isinstance(loss, (list, tuple)) else loss))

    def eval(self, inputs: Inputs) -> float:
        """The loss on ``inputs`` without updating the parameters (the eval model)."""
        self.module.eval()
        loss = self.module(*self.feeds(inputs))
        self.module.train()
        return float(np.asarray(loss[0] if isinstance(loss, (list, tuple)) else loss))

    def set_learning_rate(self, lr: float) -> None:
        """Change the learning rate for the following steps."""
        self.lr = float(lr)
        self.optimizer.set_learning_rate(self.lr)

    def parameters(self, trainable_only: bool = False) -> dict[str, np.ndarray]:
        """Current parameter values by module name (copies)."""
        names = list(self.manifest["requires_grad"])
        if not trainable_only:
            names += list(self.manifest.get("frozen_params", []))
        return {name: np.array(self.state.parameters[name].data) for name in names}

    def save_checkpoint(self, path: str | Path, include_optimizer_state: bool = True) -> str:
        """Write parameters (and AdamW moments, step count) to ``path``; ``load_trainer`` resumes from it."""
        self.state.properties["effcompile_step"] = int(self.steps_done)
        from onnxruntime.training.api import CheckpointState

        CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state)
        return str(path)


def load_trainer(folder: str | Path, checkpoint: str | Path | None = None, lr: float | None = None,
                 device: str = "cpu", threads: int | None = None) -> OrtTrainer:
    """Open ``folder``'s artifacts, resuming from ``checkpoint`` (a file written by ``save_checkpoint``)."""
    return OrtTrainer(folder, checkpoint, lr, device, threads)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(np.asarray(value))
