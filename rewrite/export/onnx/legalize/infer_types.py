"""``value_types_inferred``: ONNX shape inference fills ``value_info``, which the later rewrites read."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .infra import Rewrite

log = logging.getLogger(__name__)


class InferTypes(Rewrite):
    """Fill ``value_info`` by ONNX shape inference, run on a copy whose large initializers are typed graph
    inputs instead (no tensor data: works for models over the 2 GB protobuf limit too). The exporter's own
    entries are kept. Returns how many values gained a type."""

    name = "value_types_inferred"

    def call(self, model: onnx.ModelProto) -> int:
        light = onnx.ModelProto()
        light.ir_version = model.ir_version
        light.opset_import.extend(model.opset_import)
        light.graph.node.extend(model.graph.node)
        light.graph.input.extend(model.graph.input)
        light.graph.output.extend(model.graph.output)
        for initializer in model.graph.initializer:
            elements = int(np.prod(initializer.dims)) if initializer.dims else 1
            if elements <= 64 and initializer.data_location == 0:  # shape constants: inference reads their values
                light.graph.initializer.append(initializer)
            else:
                light.graph.input.append(onnx.helper.make_tensor_value_info(initializer.name, initializer.data_type,
                                                                            list(initializer.dims)))
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception as error:  # shapes are a help here, not a need
            log.debug("ONNX shape inference failed: %s", error)
            return 0
        # the exporter's own value_info (from PyTorch's fake tensors) is the better one: keep it, add the rest
        known = {v.name for v in model.graph.value_info}
        model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        return len(model.graph.value_info) - len(known)
