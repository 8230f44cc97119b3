"""``tanh_gelu_as_sigmoid`` (speed): GPT-2's tanh GELU written as ``x·sigmoid(x·(c₁ + c₂x²))``."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from ..helpers import constant_values
from .infra import Rewrite


class TanhGeluAsSigmoid(Rewrite):
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` (GPT-2's GELU, exported op by op) →
    ``x·sigmoid(x·(c₁ + c₂·x²))`` with c₁ = 2√(2/π), c₂ = 0.044715·c₁: the same function
    (0.5·(1 + tanh u) = sigmoid(2u)), in a form ONNX Runtime does not fuse into ``FastGelu``, whose CPU
    gradient kernel took ≈75 ms per GPT-2-small layer where these threaded elementwise ops take ≈30."""

    name = "tanh_gelu_as_sigmoid"
    speed = True

    def call(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        constants = constant_values(model)
        producer = {o: n for n in graph.node for o in n.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)

        def scalar(name: str, value: float) -> bool:
            array = constants.get(name)
            return array is not None and array.size == 1 and abs(float(array.reshape(-1)[0]) - value) < 1e-4 * max(1, abs(value))

        def split_const(node: onnx.NodeProto | None, op: str, value: float) -> str | None:
            """For ``op(v, const)`` (either order) with const == value, return v."""
            if node is None or node.op_type != op or len(node.input) != 2:
                return None
            a, b = node.input
            return a if scalar(b, value) else b if scalar(a, value) else None

        fused, dead = 0, set()
        replacements: dict[int, list[onnx.NodeProto]] = {}
        for tanh in graph.node:
            if tanh.op_type != "Tanh":
                continue
            scaled = producer.get(tanh.input[0])
            inner = split_const(scaled, "Mul", math.sqrt(2 / math.pi))
            add = producer.get(inner) if inner else None
            if add is None or add.op_type != "Add":
                continue
            x = None
            for candidate, other in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
                cube = split_const(producer.get(other), "Mul", 0.044715)
                power = producer.get(cube) if cube else None
                if power is not None and power.op_type == "Pow" and power.input[0] == candidate and scalar(power.input[1], 3.0):
                    x, pieces = candidate, [scaled, add, producer[other], power]
                    break
            if x is None:
                continue
            plus_one = [r for r in readers.get(tanh.output[0], []) if split_const(r, "Add", 1.0) == tanh.output[0]]
            if len(plus_one) != 1 or len(readers.get(tanh.output[0], [])) != 1:
                continue
            outer = readers.get(plus_one[0].output[0], [])
            if len(outer) != 1 or outer[0].op_type != "Mul":
                continue
            half_name = [i for i in outer[0].input if i != plus_one[0].output[0]]
            half = producer.get(half_name[0]) if len(half_name) == 1 else None
            if split_const(half, "Mul", 0.5) != x:
                continue
            chain = pieces + [tanh, plus_one[0]] + ([half] if len(readers.get(half.output[0], [])) == 1 else [])
            if any(len(readers.get(n.output[0], [])) != 1 for n in pieces):
                continue  # an intermediate is read elsewhere: leave the pattern alone
            out = outer[0].output[0]
            c1 = f"{out}__c1"
            c2 = f"{out}__c2"
            graph.initializer.extend([numpy_helper.from_array(np.array(2 * math.sqrt(2 / math.pi), np.float32), c1),
                                      numpy_helper.from_array(np.array(2 * math.sqrt(2 / math.pi) * 0.044715, np.float32), c2)])
            made = [onnx.helper.make_node("Mul", [x, x], [f"{out}__x2"]),
                    onnx.helper.make_node("Mul", [f"{out}__x2", c2], [f"{out}__a"]),
                    onnx.helper.make_node("Add", [f"{out}__a", c1], [f"{out}__b"]),
                    onnx.helper.make_node("Mul", [x, f"{out}__b"], [f"{out}__z"]),
                    onnx.helper.make_node("Sigmoid", [f"{out}__z"], [f"{out}__s"]),
                    onnx.helper.make_node("Mul", [x, f"{out}__s"], [out])]
            for new_node in made:
                new_node.name = f"{new_node.output[0]}__gelu"
                new_node.metadata_props.extend(tanh.metadata_props)
            replacements[id(outer[0])] = made
            dead.update(id(n) for n in chain)
            fused += 1
        if fused:
            nodes = [m for n in graph.node if id(n) not in dead for m in replacements.get(id(n), [n])]
            del graph.node[:]
            graph.node.extend(nodes)
        return fused
