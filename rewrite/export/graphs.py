"""A torch.fx Graph as JSON: its nodes (name, op, target, args, kwargs, kept meta) and its codegen.

Rebuilt node by node, so the loaded graph is the saved graph (no re-tracing). Every name that reaches the
generated Python source is checked before the graph exists: node names, placeholder targets and keyword
names are identifiers, call_method targets are allow-listed Tensor methods, get_attr/call_module targets
are paths of the module tree being rebuilt, call_function targets are allow-listed callables, and the
pytree codegen's argument names and input keys are identifiers. Its tree specs may name only tuple, list,
dict, OrderedDict, fx's immutable collections and ``transformers`` ``ModelOutput`` classes.
"""

from __future__ import annotations

import importlib
import json
import keyword
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from ..errors import OutputError, UnsafeFolderError
from . import allowlist, registry, values

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_PLACEHOLDER = re.compile(r"^\*{0,2}[A-Za-z_][A-Za-z0-9_]*$")
PATH_PART = re.compile(r"^[A-Za-z0-9_]+$")
_SPEC_TYPES = ("builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
               "torch.fx.immutable_collections.immutable_list", "torch.fx.immutable_collections.immutable_dict")
_TRANSFORMERS_NAME = re.compile(r"^transformers(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def encode_graph(graph: torch.fx.Graph, where: str) -> dict[str, Any]:
    """``graph`` as JSON-ready data. Raises NotEncodable / NotAllowed naming the node."""
    nodes = []
    for node in graph.nodes:
        at = f"{where}: node {node.name}"
        try:
            target = allowlist.encode_target(node.target) if node.op == "call_function" else node.target
            entry: dict[str, Any] = {"name": node.name, "op": node.op, "target": target,
                                     "args": [values.encode(a, _name) for a in node.args],
                                     "kwargs": {k: values.encode(v, _name) for k, v in node.kwargs.items()}}
        except (values.NotEncodable, allowlist.NotAllowed, registry.RegistrationError) as error:
            raise type(error)(f"{at} ({node.op} {_describe(node.target)}): {error}") from None
        meta = _encode_meta(node)
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return {"nodes": nodes, "codegen": _encode_codegen(graph._codegen, where)}


def _name(node: torch.fx.Node) -> str:
    return node.name


def _describe(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))


def _encode_meta(node: torch.fx.Node) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    stack = node.meta.get("nn_module_stack")
    if stack:  # symbolic_trace stores classes; a user's class may not import later: keep its name
        meta["nn_module_stack"] = [[str(key), str(path), _type_name(kind)] for key, (path, kind) in stack.items()]
    if isinstance(node.meta.get("stack_trace"), str):
        meta["stack_trace"] = node.meta["stack_trace"]
    for key, value in node.meta.items():
        if key.startswith("effcompile") and allowlist.IDENTIFIER.match(key):
            try:
                meta[key] = values.encode(value)
            except (values.NotEncodable, allowlist.NotAllowed):
                continue  # analysis annotations the next analysis recomputes
    return meta


def _type_name(kind: Any) -> str:
    return kind if isinstance(kind, str) else f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', kind)}"


def decode_graph(data: Any, where: str, lookup: Callable[[str], Any]) -> torch.fx.Graph:
    """The Graph stored by ``encode_graph``. ``lookup(path)`` returns what a get_attr/call_module path names
    in the module being rebuilt (a module, parameter, buffer or tensor; None if absent).
    Raises UnsafeFolderError for anything off the allow-list, OutputError for malformed data."""
    graph = torch.fx.Graph()
    by_name: dict[str, torch.fx.Node] = {}
    for index, entry in enumerate(as_list(as_dict(data, where).get("nodes"), where)):
        entry = as_dict(entry, f"{where}: node {index}")
        name = entry.get("name")
        if not isinstance(name, str) or not allowlist.IDENTIFIER.match(name) or name in by_name:
            raise OutputError(f"{where}: node {index} has a bad or repeated name {str(name)[:60]!r}")
        at = f"{where}: node {name}"
        op = entry.get("op")
        if op not in OPS:
            raise OutputError(f"{at}: unknown op {str(op)[:40]!r}")
        args = tuple(values.decode(a, at, by_name) for a in as_list(entry.get("args", []), at))
        kwargs = as_dict(entry.get("kwargs", {}), at)
        for key in kwargs:
            if not allowlist.IDENTIFIER.match(key) or keyword.iskeyword(key):
                raise UnsafeFolderError(f"{at}: keyword {key[:60]!r} is not a Python identifier; nothing was run")
        kwargs = {k: values.decode(v, at, by_name) for k, v in kwargs.items()}
        target = _decode_target(op, entry.get("target"), args, at, lookup)
        node = graph.create_node(op, target, args, kwargs, name=name)
        node.meta.update(_decode_meta(entry.get("meta", {}), at))
        by_name[name] = node
    graph._codegen = _decode_codegen(as_dict(data, where).get("codegen"), where)
    return graph


def _decode_target(op: str, target: Any, args: tuple, at: str, lookup: Callable[[str], Any]) -> Any:
    if op == "call_function":
        function = allowlist.decode_target(target, at)
        allowlist.check_attribute_read(target.partition(":")[2], args, at)
        return function
    if op == "call_method":
        return allowlist.check_method(target, at)
    if not isinstance(target, str):
        raise OutputError(f"{at}: target must be a string")
    if op == "placeholder":
        if not _PLACEHOLDER.match(target) or keyword.iskeyword(target.lstrip("*")):
            raise UnsafeFolderError(f"{at}: input name {target[:60]!r} is not a Python identifier; nothing was run")
        return target
    if op == "output":
        return "output"
    found = lookup(target) if all(PATH_PART.match(p) for p in target.split(".")) else None
    wanted = (torch.nn.Module,) if op == "call_module" else (torch.nn.Module, torch.Tensor)
    if not isinstance(found, wanted):
        raise UnsafeFolderError(f"{at}: {op} target {target[:80]!r} is not a {'module' if op == 'call_module' else 'module or tensor'} "
                                "of the saved module tree; nothing was run")
    return target


def _decode_meta(data: Any, at: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in as_dict(data, at).items():
        if key == "nn_module_stack":
            rows = [as_list(row, at) for row in as_list(value, at)]
            if not all(len(row) == 3 and all(isinstance(x, str) for x in row) for row in rows):
                raise OutputError(f"{at}: malformed nn_module_stack")
            meta[key] = {k: (path, kind) for k, path, kind in rows}
        elif key == "stack_trace":
            if not isinstance(value, str) or "\r" in value:
                raise OutputError(f"{at}: malformed stack_trace")
            meta[key] = value
        elif key.startswith("effcompile") and allowlist.IDENTIFIER.match(key):
            meta[key] = values.decode(value, at)
    return meta


# ------------------------------------------------------------------------------------------ codegen

def _encode_codegen(codegen: CodeGen, where: str) -> dict[str, Any]:
    if getattr(codegen, "_body_transformer", None) is not None or getattr(codegen, "_func_name", "forward") != "forward":
        raise values.NotEncodable(f"{where}: a graph with a custom code transformer")
    if type(codegen) is CodeGen:
        return {"kind": "plain"}
    if type(codegen) is _PyTreeCodeGen:
        info = codegen.pytree_info
        return {"kind": "pytree", "orig_args": list(info.orig_args),
                "in_spec": _encode_spec(info.in_spec, where), "out_spec": _encode_spec(info.out_spec, where)}
    raise values.NotEncodable(f"{where}: codegen {type(codegen).__name__}")


def _encode_spec(spec: Any, where: str) -> str | None:
    if spec is None:
        return None
    try:
        text = pytree.treespec_dumps(spec)
        _check_spec(json.loads(text), where)
    except (NotImplementedError, TypeError, UnsafeFolderError) as error:
        raise values.NotEncodable(f"{where}: the model's input/output structure {spec} ({error})") from None
    return text


def _decode_codegen(data: Any, where: str) -> CodeGen:
    data = as_dict(data, f"{where}: codegen")
    if data.get("kind") == "plain":
        return CodeGen()
    if data.get("kind") != "pytree":
        raise OutputError(f"{where}: unknown codegen {str(data.get('kind'))[:40]!r}")
    orig_args = as_list(data.get("orig_args"), where)
    if not all(isinstance(a, str) and allowlist.IDENTIFIER.match(a) and not keyword.iskeyword(a) for a in orig_args):
        raise UnsafeFolderError(f"{where}: an input name of the pytree codegen is not an identifier; nothing was run")
    in_spec = _decode_spec(data.get("in_spec"), where, inputs=True)
    out_spec = _decode_spec(data.get("out_spec"), where, inputs=False)
    return _PyTreeCodeGen(_PyTreeInfo(orig_args, in_spec, out_spec))


def _decode_spec(text: Any, where: str, inputs: bool) -> Any:
    if text is None:
        return None
    if not isinstance(text, str):
        raise OutputError(f"{where}: malformed tree spec")
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise OutputError(f"{where}: malformed tree spec ({error})") from None
    _check_spec(schema, where, inputs)
    try:
        return pytree.treespec_loads(text)
    except (NotImplementedError, KeyError, TypeError, ValueError, AssertionError) as error:
        raise OutputError(f"{where}: malformed tree spec ({error})") from None


def _check_spec(schema: Any, where: str, inputs: bool = False) -> None:
    """Only the allowed container types, contexts that are lists of plain keys, and (for inputs) keys
    that are identifiers (the codegen writes them into Python source)."""
    if not (isinstance(schema, list) and len(schema) == 2 and schema[0] == 1):
        raise OutputError(f"{where}: unsupported tree spec format")
    stack = [schema[1]]
    while stack:
        node = as_dict(stack.pop(), where)
        if set(node) != {"type", "context", "children_spec"}:
            raise OutputError(f"{where}: malformed tree spec node")
        stack.extend(as_list(node["children_spec"], where))
        if node["type"] is None:
            if node["context"] is not None:
                raise OutputError(f"{where}: malformed tree spec leaf")
            continue
        _check_spec_type(node["type"], where)
        context = json.loads(node["context"]) if isinstance(node["context"], str) else "bad"
        if context is not None and not (isinstance(context, list) and all(
                isinstance(k, (str, int)) and (not inputs or (isinstance(k, str) and allowlist.IDENTIFIER.match(k)))
                for k in context)):
            raise UnsafeFolderError(f"{where}: a tree spec context is not a list of plain keys; nothing was run")


def _check_spec_type(name: Any, where: str) -> None:
    if name in _SPEC_TYPES:
        return
    if isinstance(name, str) and _TRANSFORMERS_NAME.match(name):
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            try:  # transformers registers its output classes with pytree when their module is imported
                importlib.import_module(name.rpartition(".")[0])
            except ImportError:
                pass
        cls = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name)
        try:
            from transformers.utils import ModelOutput
        except ImportError:  # pragma: no cover - transformers is a dependency
            ModelOutput = None  # noqa: N806
        if ModelOutput is not None and isinstance(cls, type) and issubclass(cls, ModelOutput):
            return
    raise UnsafeFolderError(f"{where}: the input/output structure names type {str(name)[:100]!r}, which is not an "
                            "allowed container or transformers output class; nothing was run")


def as_dict(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else OutputError naming ``where``."""
    if not isinstance(value, dict):
        raise OutputError(f"{where}: expected an object, found {type(value).__name__}")
    return value


def as_list(value: Any, where: str) -> list[Any]:
    """``value`` if it is a JSON array, else OutputError naming ``where``."""
    if not isinstance(value, list):
        raise OutputError(f"{where}: expected a list, found {type(value).__name__}")
    return value
