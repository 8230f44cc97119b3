"""Training: one loop over a compiled module (AGA, layer-wise LR), the byte corpus, ONNX Runtime's
trainer and the pipeline runtime."""

from __future__ import annotations

from .loop import (
    CHECKPOINT,
    OPTIMIZERS,
    STEP_LOG,
    SUMMARY,
    AdaptiveAccumulation,
    GradientVarianceMeter,
    LayerSchedule,
    TrainConfig,
    Trainer,
    TrainResult,
    accumulation_steps,
    build_optimizer,
    input_builder,
    objective,
    parameter_layers,
    small_gpt_spec,
    train,
)

__all__ = ["CHECKPOINT", "OPTIMIZERS", "STEP_LOG", "SUMMARY", "AdaptiveAccumulation", "GradientVarianceMeter",
           "LayerSchedule", "Trainer", "TrainConfig", "TrainResult", "accumulation_steps", "build_optimizer",
           "input_builder", "objective", "parameter_layers", "small_gpt_spec", "train"]
