"""Can ONNX Runtime 1.19 train this model? ``check_trainable`` walks the graph before ``generate_artifacts``:
every op on a trainable-parameter→loss path needs an ORT gradient, and every trainable parameter must
reach the loss through such ops. The message names each blocking op with the module it came from."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch.fx

from ...errors import ExportError
from .helpers import FLOAT_TYPES, node_where, value_types

# Ops ONNX Runtime 1.19's gradient builder knows (orttraining gradient_builder_registry.cc).
ORT_GRADIENT_OPS = frozenset("""
Cast Sin Cos Log Tanh Sqrt Erf MatMul Split Relu Pow ReduceMean ReduceSum ReduceLogSumExp ReduceL2 Add Sub Mul
Div Neg Concat ConcatTraining Reshape Transpose Gemm MaxPool Gather Conv Squeeze Unsqueeze Sigmoid Softmax
LogSoftmax SoftmaxCrossEntropy SparseSoftmaxCrossEntropy SoftmaxCrossEntropyLoss GlobalAveragePool AveragePool
Dropout GatherND GatherElements Gelu BiasGelu FastGelu LayerNormalization SimplifiedLayerNormalization
BatchNormInternal MegatronF MegatronG Slice Where Send Recv Expand Exp Flatten TopK Clip Abs Min Max Tile ATenOp
Pad Identity PythonOp ScatterND ScatterElements Reciprocal LeakyRelu QuickGelu ConvTranspose Resize
""".split())

# Inputs that carry no gradient (indices, shapes, conditions) by op: they neither need nor block one.
NON_DIFFERENTIABLE_INPUTS = {
    "Where": {0}, "Gather": {1}, "GatherND": {1}, "GatherElements": {1}, "Reshape": {1}, "Expand": {1},
    "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3}, "Split": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "Tile": {1},
    "ReduceMean": {1}, "ReduceSum": {1}, "ReduceL2": {1}, "ReduceLogSumExp": {1}, "Clip": {1, 2},
    "SoftmaxCrossEntropyLoss": {1, 2}, "Dropout": {1, 2}, "TopK": {1}, "ScatterND": {1},
    "ScatterElements": {1}, "Pow": {1}, "Resize": {1, 2, 3},
}

NON_FLOAT_OUTPUT_OPS = frozenset("""Shape Size IsNaN IsInf Equal Less LessOrEqual Greater GreaterOrEqual And Or Not
Xor NonZero ArgMax ArgMin""".split())


def check_trainable(model: onnx.ModelProto, trainable: Sequence[str], loss_outputs: Sequence[str],
                    gm: torch.fx.GraphModule | None = None) -> None:
    """Raise ExportError unless every op on a trainable-parameter→loss path has an ORT gradient and every
    trainable parameter reaches ``loss_outputs`` through such ops. The message names each blocking op with
    the module it came from, and each parameter left without a gradient."""
    graph = model.graph
    types = value_types(model)

    non_float = {o for n in graph.node if n.op_type in NON_FLOAT_OUTPUT_OPS for o in n.output}
    non_float.update(n.output[0] for n in graph.node if n.op_type == "Cast" and n.output and any(
        a.name == "to" and a.i not in FLOAT_TYPES for a in n.attribute))  # an integer cast carries no gradient

    def is_float(name: str) -> bool:
        value = types.get(name)
        if value is None or not value.HasField("tensor_type") or not value.tensor_type.elem_type:
            return name not in non_float  # unknown type: assume it can carry a gradient unless its op says not
        return value.tensor_type.elem_type in FLOAT_TYPES

    forward = set(trainable)  # tensors that depend on a trainable parameter
    for node in graph.node:
        if any(name in forward for i, name in enumerate(node.input) if i not in NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())):
            forward.update(o for o in node.output if o and is_float(o))
    to_loss = set(loss_outputs)  # tensors the loss depends on differentiably (not through integer tensors)
    for node in reversed(graph.node):
        if any(o in to_loss and is_float(o) for o in node.output):
            to_loss.update(node.input)
    blocking = [n for n in graph.node if n.op_type not in ORT_GRADIENT_OPS
                and any(o in forward and o in to_loss for o in n.output)]
    reached = set(loss_outputs)  # tensors whose gradient ORT can build
    for node in reversed(graph.node):
        if node.op_type not in ORT_GRADIENT_OPS or not any(o in reached for o in node.output):
            continue
        skip = NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())
        reached.update(name for i, name in enumerate(node.input) if i not in skip and is_float(name))
    unreachable = [p for p in trainable if p not in reached]
    if not blocking and not unreachable:
        return
    parts = []
    if blocking:
        ops = {}
        for node in blocking:
            ops.setdefault((node.op_type, node_where(node, gm)), node.name)
        listed = "; ".join(f"{op} at {where}" for op, where in list(ops)[:8])
        more = f" (+{len(ops) - 8} more)" if len(ops) > 8 else ""
        parts.append(f"{len(blocking)} op(s) without an ONNX Runtime gradient on the parameter→loss path: {listed}{more}")
    if unreachable:
        shown = ", ".join(unreachable[:8]) + (f" (+{len(unreachable) - 8} more)" if len(unreachable) > 8 else "")
        parts.append(f"{len(unreachable)} trainable parameter(s) would get no gradient: {shown}")
    raise ExportError("onnx export: " + "; ".join(parts) + "; rewrite those ops with differentiable ones or "
                      "freeze the parameters (requires_grad=False)")
