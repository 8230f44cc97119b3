"""Pickle GraphModules without re-tracing them.

``torch.save(gm)`` rebuilds a GraphModule by re-tracing its generated code, which folds constants,
loses the output structure of exported graphs and fails on export's tracer. Here a GraphModule is
stored as its module tree plus a node list (op, target, args, kwargs), and rebuilt node by node, so the
loaded graph is the saved graph. ATen operator overloads are stored by name.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg

_KEPT_META = ("nn_module_stack", "stack_trace", "effcompile")


def _op_overload(qualified_name: str, overload: str) -> Any:
    namespace, _, name = qualified_name.partition("::")
    packet = getattr(getattr(torch.ops, namespace), name)
    return getattr(packet, overload or "default")


def _op_packet(qualified_name: str) -> Any:
    namespace, _, name = qualified_name.partition("::")
    return getattr(getattr(torch.ops, namespace), name)


class _NodeRef:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _graph_state(graph: torch.fx.Graph) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes:
        args = map_arg(node.args, lambda n: _NodeRef(n.name))
        kwargs = map_arg(node.kwargs, lambda n: _NodeRef(n.name))
        meta = {k: v for k, v in node.meta.items() if k.startswith(_KEPT_META)}
        if "nn_module_stack" in meta:  # symbolic_trace stores classes; a user's class may not import later
            meta["nn_module_stack"] = {key: (path, _type_name(kind)) for key, (path, kind) in meta["nn_module_stack"].items()}
        nodes.append((node.name, node.op, node.target, args, kwargs, node.type, meta))
    return {"nodes": nodes, "codegen": graph._codegen}


def _type_name(kind: Any) -> str:
    return kind if isinstance(kind, str) else f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', kind)}"


def _rebuild_graph(state: dict[str, Any]) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    by_name: dict[str, torch.fx.Node] = {}

    def resolve(value: Any) -> Any:
        if isinstance(value, _NodeRef):
            return by_name[value.name]
        if isinstance(value, (list, tuple)):
            resolved = [resolve(v) for v in value]
            return type(value)(resolved) if not hasattr(value, "_fields") else type(value)(*resolved)
        if isinstance(value, dict):
            return type(value)({k: resolve(v) for k, v in value.items()})
        return value

    for name, op, target, args, kwargs, type_, meta in state["nodes"]:
        node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name, type_expr=type_)
        node.meta.update(meta)
        by_name[name] = node
    graph._codegen = state["codegen"]
    return graph


def _rebuild_graph_module(root: torch.nn.Module, state: dict[str, Any], class_name: str, extra: dict) -> torch.fx.GraphModule:
    gm = torch.fx.GraphModule(root, _rebuild_graph(state), class_name)
    # GraphModule copies only what the graph reads; keep the whole tree (tied weights' owners included).
    gm._modules.update(root._modules)
    gm._parameters.update(root._parameters)
    gm._buffers.update(root._buffers)
    for key, value in extra.items():
        setattr(gm, key, value)
    return gm


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch._ops.OpOverload):
            return _op_overload, (obj._schema.name, obj._overloadname)
        if isinstance(obj, torch._ops.OpOverloadPacket):
            return _op_packet, (obj._qualified_op_name,)
        if isinstance(obj, torch.fx.GraphModule):
            root = torch.nn.Module()
            skip = {"_graph", "_code", "_modules", "_parameters", "_buffers", "training", "_lineno_map",
                    "_prologue_start", "_tracer_cls", "_tracer_extras", "meta"}
            root._modules = dict(obj._modules)
            root._parameters = dict(obj._parameters)
            root._buffers = dict(obj._buffers)
            root.training = obj.training
            extra = {k: v for k, v in obj.__dict__.items() if k not in skip and not k.startswith("_wrapped")
                     and not callable(v)}
            for key, value in list(extra.items()):
                if isinstance(value, torch.Tensor):  # plain tensor attributes the graph reads
                    setattr(root, key, value)
                    del extra[key]
            return _rebuild_graph_module, (root, _graph_state(obj.graph), type(obj).__name__, extra)
        return NotImplemented


def dumps(value: Any) -> bytes:
    """Pickle ``value`` (GraphModules inside it are stored as node lists, not code)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """Inverse of ``dumps``. Only load files you trust: this is pickle."""
    return pickle.loads(data)
