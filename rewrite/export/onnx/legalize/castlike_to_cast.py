"""``castlike_to_cast``: ``CastLike`` → ``Cast`` to the known type (ORT has no ``CastLike`` gradient)."""

from __future__ import annotations

import onnx

from ..helpers import value_types
from .infra import Rewrite


class CastLikeToCast(Rewrite):
    """``CastLike(x, like)`` → ``Cast(x, to=<like's known type>)``: ORT 1.19's gradient builder has no
    ``CastLike``. Left alone where the type of ``like`` is unknown. Exact. Returns how many nodes changed."""

    name = "castlike_to_cast"

    def call(self, model: onnx.ModelProto) -> int:
        types = value_types(model)
        count = 0
        for node in model.graph.node:
            if node.op_type != "CastLike":
                continue
            like = types.get(node.input[1])
            if like is None or not like.HasField("tensor_type") or not like.tensor_type.elem_type:
                continue
            to = like.tensor_type.elem_type
            del node.attribute[:]
            del node.input[1:]
            node.op_type = "Cast"
            node.attribute.append(onnx.helper.make_attribute("to", to))
            count += 1
        return count
