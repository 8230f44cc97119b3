"""ONNX export for ONNX Runtime training: the exporter (``exporter``), its legalisation as named rewrites
(``legalize``) and the trainability check (``check``); imports ``onnx`` and ``onnxruntime``, which
``import effcompile`` does not."""

from __future__ import annotations

from ...errors import ExportError
from .check import check_trainable
from .exporter import (
    EXPORT_OPSET,
    MANIFEST,
    ExportInfo,
    export_eval_model,
    export_training_artifacts,
)
from .legalize import legalize_for_training

__all__ = ["EXPORT_OPSET", "MANIFEST", "ExportError", "ExportInfo", "check_trainable", "export_eval_model",
           "export_training_artifacts", "legalize_for_training"]
