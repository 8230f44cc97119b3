"""The callables, method names and module classes a saved folder may name, and nothing else.

A graph node's target (and a callable passed as an argument) is stored as a string and resolved here:

- ``op:aten::add.Tensor`` / ``packet:aten::add`` / ``hop:NAME``: ``torch.ops`` overloads, packets and
  higher-order operators, looked up in the dispatcher (``aten::from_file`` is refused: it reads files);
  effcompile's own custom ops (``effcompile::rms_norm``, ... from the ``fuse`` pass) are registered by
  importing the pass modules, which a lookup in the ``effcompile`` namespace does first;
- ``fn:operator.add``, ``fn:math.sqrt``, ``fn:builtins.getattr``: fixed lists of pure functions;
- ``fn:torch.X``, ``fn:torch.nn.functional.X``, ``fn:torch.Tensor.X`` (and ``torch.linalg``/``fft``/
  ``special``): the tensor operations PyTorch itself lists as such (``torch.overrides``), plus a fixed
  list of factories and checks (``torch.zeros``, ``torch.sym_int``, ``torch._dynamo.graph_break``, ...);
- ``effcompile:NAME``: functions registered with ``effcompile.export.registry.serializable``.

``call_method`` names must be public ``torch.Tensor`` methods (hook registration and ``apply_``/``map_``
excluded); ``getattr``/``hasattr`` only read a public ``torch.Tensor`` attribute named by a literal.
Module classes are ``torch.nn`` classes (``torch.nn.modules.*``), ``GraphModule``, or registered ones.
Anything else raises ``NotAllowed`` (saving) or ``UnsafeFolderError`` (loading) without being imported.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import math
import operator
import re
import sys
from typing import Any

import torch

from ..errors import UnsafeFolderError
from . import registry

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OP_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)::([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?$")
_REFUSED_OPS = frozenset({"aten::from_file"})
OWN_NAMESPACE = "effcompile"  # the torch.library namespace of effcompile's custom ops
# Tensor methods that take a Python callable (a hook or an element-wise function): never from a folder.
_REFUSED_METHODS = frozenset({"register_hook", "register_post_accumulate_grad_hook", "apply_", "map_", "map2_"})
# Higher-order operators capture emits; each runs a subgraph of the saved tree.
_HIGHER_ORDER = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast", "tag_activation_checkpoint",
                           "auto_functionalized", "auto_functionalized_v2"})

_OPERATOR = ("abs", "add", "and_", "concat", "contains", "delitem", "eq", "floordiv", "ge", "getitem", "gt",
             "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "index", "inv", "invert",
             "ior", "ipow", "irshift", "is_", "is_not", "isub", "itruediv", "ixor", "le", "lshift", "lt", "matmul",
             "mod", "mul", "ne", "neg", "not_", "or_", "pos", "pow", "rshift", "setitem", "sub", "truediv",
             "truth", "xor")
_BUILTINS = ("abs", "all", "any", "bool", "dict", "divmod", "float", "getattr", "hasattr", "int", "len", "list",
             "max", "min", "pow", "range", "round", "slice", "sum", "tuple")
_ATTRIBUTE_READERS = ("builtins.getattr", "builtins.hasattr")
# Tensor factories, queries and symbolic-shape helpers that capture emits but torch.overrides does not list.
_TORCH_EXTRAS = ("arange", "as_tensor", "broadcast_shapes", "can_cast", "empty", "empty_like", "empty_permuted",
                 "empty_strided", "eye", "finfo", "full", "full_like", "get_autocast_dtype", "get_default_dtype",
                 "iinfo", "is_autocast_enabled", "is_grad_enabled", "is_tensor", "linspace", "logspace", "ones",
                 "ones_like", "promote_types", "rand", "rand_like", "randint", "randint_like", "randn", "randn_like",
                 "randperm", "result_type", "scalar_tensor", "sym_float", "sym_int", "sym_ite", "sym_max",
                 "sym_min", "sym_not", "sym_sum", "tensor", "tril_indices", "triu_indices", "zeros", "zeros_like",
                 "_assert", "_check", "_check_is_size", "_assert_async")
# name -> (module, attribute): imported only when a folder names them (the module is torch's own).
_LAZY = {
    "torch._dynamo.graph_break": ("torch._dynamo.decorators", "graph_break"),
    "torch._C._set_grad_enabled": ("torch._C", "_set_grad_enabled"),
    "torch.amp.autocast_mode._enter_autocast": ("torch.amp.autocast_mode", "_enter_autocast"),
    "torch.amp.autocast_mode._exit_autocast": ("torch.amp.autocast_mode", "_exit_autocast"),
    "torch.fx._symbolic_trace._assert_is_none": ("torch.fx._symbolic_trace", "_assert_is_none"),
}


class NotAllowed(Exception):
    """Raised while saving: the object cannot be stored as an allow-listed name (the message says why)."""


@functools.lru_cache(maxsize=1)
def _static_functions() -> dict[str, Any]:
    """Allow-listed functions by stored name (without the ``fn:`` prefix)."""
    table: dict[str, Any] = {}
    for name in _OPERATOR:
        table[f"operator.{name}"] = getattr(operator, name)
    for name in _BUILTINS:
        table[f"builtins.{name}"] = getattr(builtins, name)
    for name in dir(math):
        value = getattr(math, name)
        if not name.startswith("_") and callable(value):
            table[f"math.{name}"] = value
    overridable = torch.overrides.get_overridable_functions()
    namespaces = [("torch", torch), ("torch.nn.functional", torch.nn.functional),
                  ("torch.functional", torch.functional), ("torch.linalg", torch.linalg),
                  ("torch.fft", torch.fft), ("torch.special", torch.special), ("torch.Tensor", torch.Tensor)]
    for prefix, namespace in namespaces:
        listed = {id(f) for f in overridable.get(namespace, ())}
        for name in dir(namespace):
            if prefix == "torch.Tensor" and (name.startswith("_") or name in _REFUSED_METHODS):
                continue
            value = getattr(namespace, name, None)
            if value is not None and id(value) in listed:
                table.setdefault(f"{prefix}.{name}", value)
    for name in _TORCH_EXTRAS:
        if hasattr(torch, name):
            table.setdefault(f"torch.{name}", getattr(torch, name))
    return table


@functools.lru_cache(maxsize=1)
def _static_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in _static_functions().items():
        names.setdefault(id(value), name)
    return names


def _lazy_value(name: str) -> Any:
    module_name, attribute = _LAZY[name]
    return getattr(importlib.import_module(module_name), attribute)


def encode_target(target: Any) -> str:
    """The stored name of a call_function target or callable argument. Raises NotAllowed."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target._schema.name}.{target._overloadname}"
        _check_op(target._schema.name)
        return f"op:{name}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        _check_op(target._qualified_op_name)
        return f"packet:{target._qualified_op_name}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() not in _HIGHER_ORDER or getattr(torch.ops.higher_order, target.name(), None) is not target:
            raise NotAllowed(f"higher-order operator {target.name()} is not on the allow-list")
        return f"hop:{target.name()}"
    name = _static_names().get(id(target))
    if name is not None:
        return f"fn:{name}"
    for name, (module_name, attribute) in _LAZY.items():
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, attribute, None) is target:
            return f"fn:{name}"
    entry = registry.registration_of(target)
    if entry is not None and not isinstance(target, type):
        return f"effcompile:{entry.name}"
    if registry.is_effcompile_object(target):
        raise registry.RegistrationError(
            f"{target.__module__}.{target.__qualname__} is not registered; decorate it with "
            "@effcompile.export.registry.serializable (a bug in effcompile, report it)")
    described = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
    raise NotAllowed(f"{described} is not a torch operation, operator/math function or registered effcompile "
                     "function, so a saved folder cannot name it")


def _check_op(qualified: str) -> None:
    if qualified in _REFUSED_OPS:
        raise NotAllowed(f"{qualified} reads files")


def decode_target(stored: Any, where: str) -> Any:
    """The callable a stored name refers to, or UnsafeFolderError naming ``where`` (a node or attribute)."""
    if not isinstance(stored, str):
        raise UnsafeFolderError(f"{where}: a callable must be stored as a name, not {type(stored).__name__}")
    kind, _, name = stored.partition(":")
    value: Any = None
    if kind in ("op", "packet"):
        value = _resolve_op(name, kind == "op")
    elif kind == "hop" and name in _HIGHER_ORDER:
        candidate = getattr(torch.ops.higher_order, name, None)
        value = candidate if isinstance(candidate, torch._ops.HigherOrderOperator) else None
    elif kind == "fn":
        value = _static_functions().get(name)
        if value is None and name in _LAZY:
            value = _lazy_value(name)
    elif kind == "effcompile":
        entry = registry.registered(name)
        value = entry.obj if entry is not None and not isinstance(entry.obj, type) else None
    if value is None:
        raise UnsafeFolderError(f"{where} names {stored[:120]!r}, which is not an allow-listed torch op or "
                                "effcompile function; nothing was run")
    return value


def _resolve_op(name: str, overload: bool) -> Any:
    match = _OP_NAME.match(name)
    if match is None or name.partition(".")[0] in _REFUSED_OPS:
        return None
    namespace, op, overload_name = match.groups()
    if namespace.startswith("__") or op.startswith("__") or (overload and overload_name is None) or \
            (not overload and overload_name is not None):
        return None
    found = getattr(torch.ops, namespace, None)
    if not isinstance(found, torch._ops._OpNamespace):
        return None
    if namespace == OWN_NAMESPACE:  # defined with torch.library.custom_op when a pass module is imported
        registry.import_pass_modules()
    try:
        packet = getattr(found, op)
        value = getattr(packet, overload_name) if overload else packet
    except (AttributeError, RuntimeError):
        return None
    expected = torch._ops.OpOverload if overload else torch._ops.OpOverloadPacket
    return value if isinstance(value, expected) else None


def check_method(name: Any, where: str) -> str:
    """A call_method target: a public torch.Tensor method other than hook registration/apply. Raises
    UnsafeFolderError."""
    if not isinstance(name, str) or not is_tensor_attribute(name) or name in _REFUSED_METHODS:
        raise UnsafeFolderError(f"{where} calls method {str(name)[:80]!r}, which is not an allow-listed "
                                "torch.Tensor method; nothing was run")
    return name


def is_tensor_attribute(name: str) -> bool:
    """True for a public attribute name of ``torch.Tensor`` (``view``, ``shape``, ``dtype``, ...)."""
    return bool(IDENTIFIER.match(name)) and not name.startswith("_") and hasattr(torch.Tensor, name)


def check_attribute_read(target_name: str, args: tuple, where: str) -> None:
    """``getattr(x, NAME[, default])`` / ``hasattr(x, NAME)`` may only read a public torch.Tensor attribute
    named by a literal (a graph could otherwise walk from any object to any function)."""
    if target_name in _ATTRIBUTE_READERS:
        name = args[1] if len(args) > 1 else None
        if not isinstance(name, str) or not is_tensor_attribute(name) or name in _REFUSED_METHODS:
            raise UnsafeFolderError(f"{where} reads attribute {str(name)[:80]!r} with {target_name}; only public "
                                    "torch.Tensor attributes are allowed; nothing was run")


# ------------------------------------------------------------------------------------------- classes

def encode_class(cls: type) -> str:
    """The stored name of a module class: ``torch.nn:<module>.<Class>`` or ``effcompile:<name>``.
    Raises NotAllowed for any other class."""
    entry = registry.registration_of(cls)
    if entry is not None:
        return f"effcompile:{entry.name}"
    module = cls.__module__
    if module.startswith("torch.nn.modules.") and IDENTIFIER.match(cls.__qualname__) and \
            getattr(sys.modules.get(module), cls.__qualname__, None) is cls:
        return f"torch.nn:{module}.{cls.__qualname__}"
    if registry.is_effcompile_object(cls):
        raise registry.RegistrationError(
            f"module class {module}.{cls.__qualname__} is not registered; decorate it with "
            "@effcompile.export.registry.serializable (a bug in effcompile, report it)")
    raise NotAllowed(f"module class {module}.{cls.__qualname__} is neither a torch.nn module nor an effcompile "
                     "module, so a saved folder cannot name it")


def decode_class(stored: Any, where: str) -> tuple[type, registry.Registered | None]:
    """The module class a stored name refers to (and its registration, for effcompile classes).
    Raises UnsafeFolderError for anything else; nothing is imported for a refused name."""
    kind, _, name = str(stored).partition(":")
    if kind == "effcompile":
        entry = registry.registered(name)
        if entry is not None and isinstance(entry.obj, type) and issubclass(entry.obj, torch.nn.Module):
            return entry.obj, entry
    elif kind == "torch.nn":
        module_name, _, class_name = name.rpartition(".")
        module = sys.modules.get(module_name) if module_name.startswith("torch.nn.modules.") else None
        cls = getattr(module, class_name, None) if module is not None and IDENTIFIER.match(class_name) else None
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module_name \
                and not issubclass(cls, torch.fx.GraphModule):
            return cls, None
    raise UnsafeFolderError(f"{where} has module class {str(stored)[:120]!r}, which is neither a torch.nn module "
                            "nor a registered effcompile module; nothing was run")
