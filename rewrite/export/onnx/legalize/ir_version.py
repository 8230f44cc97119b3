"""``ir_version_lowered``: the model's IR version is capped at what ONNX Runtime 1.19 loads (10)."""

from __future__ import annotations

import onnx

from .infra import Rewrite

MAX_IR_VERSION = 10


class LowerIrVersion(Rewrite):
    """IR version > ``MAX_IR_VERSION`` → ``MAX_IR_VERSION`` (the rewrites use nothing newer). Returns 1 when
    lowered, else 0."""

    name = "ir_version_lowered"

    def call(self, model: onnx.ModelProto) -> int:
        if model.ir_version <= MAX_IR_VERSION:
            return 0
        model.ir_version = MAX_IR_VERSION
        return 1
