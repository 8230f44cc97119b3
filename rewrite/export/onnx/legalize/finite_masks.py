"""``neg_inf_constants``: ``-inf`` constants → a large finite negative (``-inf`` masks train to NaN in ORT)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import FINITE_NEG, FLOAT_TYPES
from .infra import Rewrite


class FiniteMasks(Rewrite):
    """``-inf`` in constants (attributes, in-memory initializers under 1 MiB) → a large finite negative
    (``FINITE_NEG`` of the tensor's type): masks holding ``-inf`` train to NaN in ORT (a fully masked row's
    softmax gradient is ``0·inf``). Returns how many constants changed."""

    name = "neg_inf_constants"

    def call(self, model: onnx.ModelProto) -> int:
        count = 0

        def fix(tensor: onnx.TensorProto) -> bool:
            if tensor.data_type not in FLOAT_TYPES or tensor.data_location != 0:
                return False
            array = numpy_helper.to_array(tensor)
            mask = np.isneginf(array)
            if not mask.any():
                return False
            array = array.copy()
            array[mask] = FINITE_NEG[tensor.data_type]
            tensor.CopyFrom(numpy_helper.from_array(array.astype(array.dtype), tensor.name))
            return True

        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR and fix(attribute.t):
                    count += 1
                elif attribute.type == onnx.AttributeProto.FLOAT and attribute.f == -math.inf:
                    attribute.f = FINITE_NEG[onnx.TensorProto.FLOAT]
                    count += 1
        for initializer in model.graph.initializer:
            if initializer.data_type in FLOAT_TYPES and initializer.ByteSize() < 1 << 20 and fix(initializer):
                count += 1
        return count
