"""``nan_guards_dropped`` (speed): attention's ``Where(IsNaN(p), 0, p)`` dropped once no ``-inf`` is left."""

from __future__ import annotations

import onnx

from ..helpers import constant_values, has_neg_inf
from .infra import Rewrite


class DropNanGuards(Rewrite):
    """``Where(IsNaN(p), 0, p)`` after attention's softmax only catches rows masked entirely with ``-inf``;
    once masks are finite (``FiniteMasks``) no such row exists: read ``p`` directly (two passes fewer
    over the attention matrix each way)."""

    name = "nan_guards_dropped"
    speed = True

    def call(self, model: onnx.ModelProto) -> int:
        if has_neg_inf(model):  # a row masked entirely with -inf can still produce NaN
            return 0
        graph = model.graph
        constants = constant_values(model)
        producer = {o: n for n in graph.node for o in n.output}
        renames: dict[str, str] = {}
        dead: set[int] = set()
        for node in graph.node:
            if node.op_type != "Where" or len(node.input) != 3:
                continue
            guard = producer.get(node.input[0])
            zero = constants.get(node.input[1])
            if guard is None or guard.op_type != "IsNaN" or guard.input[0] != node.input[2] or zero is None \
                    or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
                continue
            if node.output[0] in {o.name for o in graph.output}:
                continue
            renames[node.output[0]] = node.input[2]
            dead.add(id(node))
        if not renames:
            return 0
        nodes = [n for n in graph.node if id(n) not in dead]
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        used = {name for n in nodes for name in n.input}
        nodes = [n for n in nodes if not (n.op_type == "IsNaN" and n.output[0] not in used)]
        del graph.node[:]
        graph.node.extend(nodes)
        return len(renames)
