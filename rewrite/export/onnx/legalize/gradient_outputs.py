"""``gradient_outputs_named`` (training): name the optional outputs ORT's gradient builder reads."""

from __future__ import annotations

import onnx

from .infra import Rewrite


class NameGradientOutputs(Rewrite):
    """Name the optional outputs the gradient builder reads: ``LayerNormalization``'s Mean and InvStdDev,
    ``Dropout``'s mask (without them it fails at ``gradient_builder_base.h:123 i < OutputDefs().size()``)."""

    name = "gradient_outputs_named"
    training_only = True

    def call(self, model: onnx.ModelProto) -> int:
        count = 0
        for node in model.graph.node:
            if node.op_type == "LayerNormalization" and len(node.output) == 1:
                node.output.extend([node.output[0] + "__mean", node.output[0] + "__inv_std_dev"])
                count += 1
            elif node.op_type == "Dropout" and len(node.output) == 1:
                node.output.append(node.output[0] + "__mask")
                count += 1
        return count
