"""Leaving PyTorch: the saved module format (``module``), ONNX export and its legalisation for ONNX
Runtime training (``onnx``). ``OrtTrainer`` (``effcompile.train.ort``) trains on the artifacts. The ONNX
modules are imported lazily so that ``import effcompile`` does not need ``onnx`` or ``onnxruntime-training``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError

__all__ = ["export_training_artifacts", "export_eval_model", "legalize_for_training", "ExportError"]


def __getattr__(name: str) -> Any:
    if name in ("export_training_artifacts", "export_eval_model", "legalize_for_training"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
