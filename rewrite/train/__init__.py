"""Training: one loop (``loop``) over a backend (``backends``: PyTorch, ONNX Runtime), adaptive gradient
accumulation (``aga``), learning-rate schedules (``schedules``), the byte corpus (``data``), token inputs
and losses (``inputs``), ONNX Runtime's trainer (``ort``) and the pipeline runtime (``pipeline``)."""

from __future__ import annotations

from .aga import AdaptiveAccumulation, GradientVarianceMeter, accumulation_steps
from .backends import Backend, OrtBackend, StepOutcome, TorchBackend
from .config import (
           CHECKPOINT,
           OPTIMIZERS,
           ORT_CHECKPOINT,
           ORT_STATE,
           RUN_FILES,
           STEP_LOG,
           SUMMARY,
           TrainConfig,
)
from .inputs import input_builder, objective, small_gpt_spec
from .loop import Trainer, TrainResult, train
from .schedules import LayerSchedule, build_optimizer, parameter_layers

__all__ = ["CHECKPOINT", "OPTIMIZERS", "ORT_CHECKPOINT", "ORT_STATE", "RUN_FILES", "STEP_LOG", "SUMMARY",
           "AdaptiveAccumulation", "Backend", "GradientVarianceMeter", "LayerSchedule", "OrtBackend", "StepOutcome",
           "TorchBackend", "Trainer", "TrainConfig", "TrainResult", "accumulation_steps", "build_optimizer",
           "input_builder", "objective", "parameter_layers", "small_gpt_spec", "train"]
