"""``axes_made_vectors``: a 0-d ``axes`` of ``Unsqueeze``/``Squeeze`` → a 1-element vector."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import constant_values
from .infra import Rewrite


class VectorAxes(Rewrite):
    """Give every ``Unsqueeze``/``Squeeze`` whose ``axes`` is a 0-d constant (``constant_values``: an initializer or
    a ``Constant`` node) a 1-element vector instead. The exporter's translation of SDPA's ``enable_gqa``
    (grouped key/value heads, e.g. inside ``remat``'s checkpointed Llama blocks) unsqueezes with a scalar axis;
    ORT's Unsqueeze accepts it, but the gradient builder reuses the same axes for the ``Squeeze`` of the
    gradient, and Squeeze requires a vector (``An axes tensor must be a vector tensor`` at the first training
    step). Returns how many inputs changed."""

    name = "axes_made_vectors"

    def call(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        scalars = {name: value for name, value in constant_values(model).items() if value.ndim == 0}
        vectors: dict[str, str] = {}
        count = 0
        for node in graph.node:
            if node.op_type not in ("Unsqueeze", "Squeeze") or len(node.input) < 2 or node.input[1] not in scalars:
                continue
            source = node.input[1]
            if source not in vectors:
                vectors[source] = f"{source}__vector"
                graph.initializer.append(numpy_helper.from_array(scalars[source].reshape(1).astype(np.int64),
                                                                 vectors[source]))
            node.input[1] = vectors[source]
            count += 1
        return count
