"""ONNX export for ONNX Runtime training: the exporter and its legalisation (imports ``onnx`` and
``onnxruntime``; ``import effcompile`` does not)."""

from __future__ import annotations

from .exporter import (
    EXPORT_OPSET,
    MANIFEST,
    ExportError,
    ExportInfo,
    export_eval_model,
    export_training_artifacts,
)
from .legalize import legalize_for_training

__all__ = ["EXPORT_OPSET", "MANIFEST", "ExportError", "ExportInfo", "export_eval_model",
           "export_training_artifacts", "legalize_for_training"]
