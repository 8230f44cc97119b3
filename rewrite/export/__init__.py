"""Leaving PyTorch: ONNX export, legalisation for ONNX Runtime training, and a trainer over its artifacts.

``export_training_artifacts`` / ``export_eval_model`` (``effcompile.export.onnx``) write the files;
``OrtTrainer`` (``effcompile.export.ort_train``) trains on them. The ONNX modules are imported lazily so
that ``import effcompile`` does not need ``onnx`` or ``onnxruntime-training``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_training_artifacts", "export_eval_model", "legalize_for_training", "ExportError",
           "OrtTrainer", "load_trainer"]


def __getattr__(name: str) -> Any:
    if name in ("export_training_artifacts", "export_eval_model", "legalize_for_training", "ExportError"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    if name in ("OrtTrainer", "load_trainer"):
        from . import ort_train

        return getattr(ort_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
