"""``opset_converted``: a default-domain opset newer than ONNX Runtime 1.19 reads (21) is converted down."""

from __future__ import annotations

import onnx

from ....errors import ExportError
from ..helpers import default_opset
from .infra import Rewrite

MAX_OPSET = 21


class LowerOpset(Rewrite):
    """Default-domain opset > ``MAX_OPSET`` → ``MAX_OPSET`` by ``onnx.version_converter``. Returns 1 when
    converted, else 0."""

    name = "opset_converted"

    def call(self, model: onnx.ModelProto) -> int:
        if default_opset(model) <= MAX_OPSET:
            return 0
        model.CopyFrom(onnx.version_converter.convert_version(model, MAX_OPSET))
        return 1

    def ensures(self, model: onnx.ModelProto) -> None:
        if default_opset(model) > MAX_OPSET:
            raise ExportError(f"onnx export: opset {default_opset(model)} could not be lowered to {MAX_OPSET}; "
                              f"export with opset ≤ {MAX_OPSET}")
