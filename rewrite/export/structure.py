"""The module tree of a saved module as JSON (``structure.json``), its tensors named into a table.

``encode_module`` walks the tree depth-first (a module's parameters, buffers and tensor attributes, then
its children in order) and returns the JSON-ready structure plus each distinct tensor under the first
name that reaches it; a tensor or module met again is a reference to that name (tied weights, modules
shared by pipeline stages). Each module is stored as its class (``allowlist.encode_class``), training
flag, plain attributes (``values``), parameters/buffers/tensor attributes by tensor name, children, and
for a GraphModule its graph (``graphs``). ``decode_module`` rebuilds it without running any class's
``__init__``: ``cls.__new__`` + ``nn.Module.__init__`` and the stored attributes, or for a GraphModule an
empty one that receives its children first and its checked graph last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from ..errors import OutputError, UnsafeFolderError
from . import allowlist, graphs, registry, values

GRAPH_MODULE = "torch.fx:GraphModule"
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__)
_GRAPH_INTERNALS = frozenset(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()).__dict__) | {"_in_spec", "_out_spec"}


@dataclass
class Encoded:
    """What ``encode_module`` returns: the root's JSON and the tensor table (name → tensor)."""

    root: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode_module(module: torch.nn.Module) -> Encoded:
    """The module tree as JSON-ready data. Raises NotEncodable / NotAllowed naming the module path."""
    encoded = Encoded({})
    seen_tensors: dict[int, str] = {}
    seen_modules: dict[int, str] = {}

    def tensor_name(path: str, tensor: torch.Tensor) -> str:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise values.NotEncodable(f"{path or '<root>'}: a tensor of type {type(tensor).__qualname__}")
        if id(tensor) not in seen_tensors:
            seen_tensors[id(tensor)] = path
            encoded.tensors[path] = tensor
        return seen_tensors[id(tensor)]

    def walk(current: torch.nn.Module, path: str) -> dict[str, Any]:
        seen_modules[id(current)] = path
        prefix = f"{path}." if path else ""
        entry = _encode_own(current, path)
        entry["parameters"] = {n: None if p is None else tensor_name(prefix + n, p) for n, p in current._parameters.items()}
        entry["buffers"] = {n: None if b is None else tensor_name(prefix + n, b) for n, b in current._buffers.items()}
        entry["non_persistent"] = sorted(current._non_persistent_buffers_set)
        entry["tensor_attributes"] = {n: tensor_name(prefix + n, v) for n, v in current.__dict__.items()
                                      if isinstance(v, torch.Tensor)}
        children: dict[str, Any] = {}
        for name, child in current._modules.items():
            if child is None:
                children[name] = None
            elif id(child) in seen_modules:
                children[name] = {"ref": seen_modules[id(child)]}
            else:
                children[name] = walk(child, prefix + name)
        entry["modules"] = children
        if isinstance(current, torch.fx.GraphModule):
            entry["graph"] = graphs.encode_graph(current.graph, path or "<root>")
        return entry

    encoded.root = walk(module, "")
    return encoded


def _encode_own(module: torch.nn.Module, path: str) -> dict[str, Any]:
    where = f"module {path or '<root>'} ({type(module).__qualname__})"
    for name, hooks in module.__dict__.items():
        if "hook" in name and isinstance(hooks, dict) and hooks:
            raise values.NotEncodable(f"{where}: it has {name} registered (hooks are code, not data)")
    refusal = module.__dict__.get(registry.UNSAVEABLE)
    if isinstance(refusal, str):
        raise allowlist.NotAllowed(f"{where}: {refusal}")
    graph_module = isinstance(module, torch.fx.GraphModule)
    if graph_module:
        entry: dict[str, Any] = {"class": GRAPH_MODULE, "class_name": type(module).__name__}
        internals, transient = _GRAPH_INTERNALS, {}
        entry["meta"] = _encode_meta(module.meta)
    else:
        try:
            entry = {"class": allowlist.encode_class(type(module))}
        except (allowlist.NotAllowed, registry.RegistrationError) as error:
            raise type(error)(f"{where}: {error}") from None
        registration = registry.registration_of(type(module))
        internals, transient = _MODULE_INTERNALS, (registration.transient if registration else {})
    entry["training"] = bool(module.training)
    attributes = {}
    for name, value in module.__dict__.items():
        if name in internals or name in transient:
            continue
        if hasattr(type(module), name):
            raise values.NotEncodable(f"{where}: attribute {name!r} shadows a class attribute (a folder may not "
                                      "replace methods or class settings)")
        if isinstance(value, torch.Tensor):
            continue
        try:
            attributes[name] = values.encode(value)
        except (values.NotEncodable, allowlist.NotAllowed) as error:
            if registry.is_effcompile_object(type(module)):
                raise registry.RegistrationError(
                    f"{where}: attribute {name!r} is {error}, not data; declare it in @serializable(transient=...) "
                    "(a bug in effcompile, report it)") from None
            raise values.NotEncodable(f"{where}: attribute {name!r} is {error}, not data") from None
    entry["attributes"] = attributes
    return entry


def _encode_meta(meta: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for key, value in meta.items():
        try:
            kept[key] = values.encode(value)
        except (values.NotEncodable, allowlist.NotAllowed):
            continue  # capture-time annotations (shape environments, ...) are not needed to run
    return kept


# --------------------------------------------------------------------------------------------- decode

def decode_module(data: Any, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the tree stored by ``encode_module`` around ``tensors`` (the checked tensor table).
    Raises UnsafeFolderError for a class, callable or name off the allow-list, OutputError for malformed
    data."""
    built: dict[str, torch.nn.Module] = {}

    def tensor(name: Any, at: str) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise OutputError(f"{at}: names tensor {str(name)[:80]!r}, which weights.safetensors lacks")
        return tensors[name]

    def build(entry: Any, path: str) -> torch.nn.Module:
        at = f"module {path or '<root>'}"
        entry = graphs.as_dict(entry, at)
        kind = entry.get("class")
        if kind == GRAPH_MODULE:
            module: torch.nn.Module = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph(),
                                                           _class_name(entry.get("class_name"), at))
            module.meta.update({k: values.decode(v, at) for k, v in graphs.as_dict(entry.get("meta", {}), at).items()})
            registration = None
        else:
            cls, registration = allowlist.decode_class(kind, at)
            module = cls.__new__(cls)
            torch.nn.Module.__init__(module)
        reserved = set(module.__dict__)
        module.training = bool(entry.get("training", True))
        for name, value in graphs.as_dict(entry.get("attributes", {}), at).items():
            _check_attribute_name(name, reserved, module, at)
            module.__dict__[name] = values.decode(value, f"{at}.{name}")
        for name, factory in (registration.transient.items() if registration else ()):
            module.__dict__[name] = factory()
        prefix = f"{path}." if path else ""
        for name, key in graphs.as_dict(entry.get("parameters", {}), at).items():
            _check_member_name(name, reserved, at)
            module._parameters[name] = None if key is None else _as_parameter(tensor(key, f"{at}.{name}"), at)
        for name, key in graphs.as_dict(entry.get("buffers", {}), at).items():
            _check_member_name(name, reserved, at)
            module._buffers[name] = None if key is None else tensor(key, f"{at}.{name}")
        module._non_persistent_buffers_set = {n for n in graphs.as_list(entry.get("non_persistent", []), at)
                                              if n in module._buffers}
        for name, key in graphs.as_dict(entry.get("tensor_attributes", {}), at).items():
            _check_attribute_name(name, reserved, module, at)
            module.__dict__[name] = tensor(key, f"{at}.{name}")
        for name, child in graphs.as_dict(entry.get("modules", {}), at).items():
            _check_member_name(name, reserved, at)
            module._modules[name] = _child(child, prefix + name, built, build)
        if isinstance(module, torch.fx.GraphModule):
            graph = graphs.decode_graph(entry.get("graph"), at, lambda target: _lookup(module, target))
            graph.lint()
            module.graph = graph  # generates forward() from the checked graph
        built[path] = module
        return module

    return build(data, "")


def _child(child: Any, path: str, built: dict[str, torch.nn.Module], build: Any) -> torch.nn.Module | None:
    if child is None:
        return None
    if isinstance(child, dict) and set(child) == {"ref"}:
        if child["ref"] not in built:
            raise OutputError(f"module {path}: refers to {str(child['ref'])[:80]!r}, which is not an earlier module")
        return built[child["ref"]]
    return build(child, path)


def _as_parameter(tensor: torch.Tensor, at: str) -> torch.nn.Parameter:
    if not isinstance(tensor, torch.nn.Parameter):
        raise OutputError(f"{at}: a parameter names a tensor the table does not mark as a parameter")
    return tensor


def _class_name(name: Any, at: str) -> str:
    if not isinstance(name, str) or not allowlist.IDENTIFIER.match(name):
        raise UnsafeFolderError(f"{at}: GraphModule class name {str(name)[:60]!r} is not an identifier")
    return name


def _check_attribute_name(name: str, reserved: set[str], module: torch.nn.Module, at: str) -> None:
    """An instance attribute may not be a dunder, an nn.Module internal, or shadow anything the class
    defines (a method such as ``forward``, or ``_compiled_call_impl``, which ``__call__`` would call)."""
    if not allowlist.IDENTIFIER.match(name) or name.startswith("__") or name in reserved or \
            hasattr(type(module), name):
        raise UnsafeFolderError(f"{at}: attribute name {name[:60]!r} is not allowed; nothing was run")


def _check_member_name(name: str, reserved: set[str], at: str) -> None:
    if not graphs.PATH_PART.match(name) or name.startswith("__") or name in reserved:
        raise UnsafeFolderError(f"{at}: member name {name[:60]!r} is not allowed; nothing was run")


def _lookup(module: torch.nn.Module, target: str) -> Any:
    """What ``target`` (a dotted path) names through submodules only: a module, parameter, buffer or
    tensor attribute; None otherwise."""
    *owners, last = target.split(".")
    current: Any = module
    for part in owners:
        current = current._modules.get(part) if isinstance(current, torch.nn.Module) else None
        if current is None:
            return None
    if not isinstance(current, torch.nn.Module):
        return None
    for table in (current._modules, current._parameters, current._buffers):
        if last in table:
            return table[last]
    value = current.__dict__.get(last)
    return value if isinstance(value, torch.Tensor) else None
