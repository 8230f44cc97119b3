"""Argument and attribute values as JSON, with tags for what JSON lacks.

``None``, ``bool``, ``int``, ``str`` and finite ``float`` are themselves; a JSON array is a ``list``;
everything else is an object with a ``"$"`` tag: ``tuple``, ``immutable_list``, ``dict`` /
``immutable_dict`` / ``OrderedDict`` (items as pairs, so keys keep their types), ``float`` (inf, nan),
``complex``, ``dtype``, ``device``, ``layout``, ``memory_format``, ``size`` (``torch.Size``), ``slice``,
``ellipsis``, ``node`` (a reference to an earlier graph node by name) and ``fn`` (an allow-listed callable,
see ``allowlist``). Decoding builds only these types; an unknown tag is a damaged folder.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..errors import OutputError
from . import allowlist

_ENUMS: dict[str, type] = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_DICTS: dict[str, type] = {"dict": dict, "immutable_dict": immutable_dict, "OrderedDict": collections.OrderedDict}


class NotEncodable(Exception):
    """A value has a type the format does not store (the message names it)."""


def encode(value: Any, node_name: Callable[[torch.fx.Node], str] | None = None) -> Any:
    """``value`` as JSON-ready data. ``node_name`` names graph nodes (None: nodes are not allowed).
    Raises NotEncodable (or ``allowlist.NotAllowed`` for a callable off the allow-list)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
    if isinstance(value, torch.fx.Node):
        if node_name is None:
            raise NotEncodable("a graph node outside a graph")
        return {"$": "node", "v": node_name(value)}
    if isinstance(value, torch.Size):
        return {"$": "size", "v": [encode(v, node_name) for v in value]}
    if isinstance(value, immutable_list):
        return {"$": "immutable_list", "v": [encode(v, node_name) for v in value]}
    if type(value) is list:
        return [encode(v, node_name) for v in value]
    if type(value) is tuple:
        return {"$": "tuple", "v": [encode(v, node_name) for v in value]}
    for tag, kind in _DICTS.items():
        if type(value) is kind:
            return {"$": tag, "v": [[encode(k, node_name), encode(v, node_name)] for k, v in value.items()]}
    for tag, kind in _ENUMS.items():
        if isinstance(value, kind):
            return {"$": tag, "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$": "device", "v": str(value)}
    if isinstance(value, complex):
        return {"$": "complex", "v": [encode(value.real), encode(value.imag)]}
    if isinstance(value, slice):
        return {"$": "slice", "v": [encode(v, node_name) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if callable(value) and not isinstance(value, (torch.Tensor, torch.nn.Module)):
        return {"$": "fn", "v": allowlist.encode_target(value)}
    raise NotEncodable(f"a value of type {type(value).__module__}.{type(value).__qualname__}")


def decode(data: Any, where: str, nodes: dict[str, torch.fx.Node] | None = None, depth: int = 0) -> Any:
    """The value ``encode`` stored as ``data``; ``nodes`` resolves node references (None: none allowed).
    Raises OutputError for malformed data, UnsafeFolderError for a callable off the allow-list."""
    if depth > 64:
        raise OutputError(f"{where}: values are nested more than 64 deep")
    if data is None or isinstance(data, (bool, int, str, float)):
        return data
    if isinstance(data, list):
        return [decode(v, where, nodes, depth + 1) for v in data]
    if not isinstance(data, dict) or not isinstance(data.get("$"), str):
        raise OutputError(f"{where}: malformed value {str(data)[:80]}")
    tag, raw = data["$"], data.get("v")
    items = raw if isinstance(raw, list) else []

    def each() -> list[Any]:
        return [decode(v, where, nodes, depth + 1) for v in items]

    if tag == "tuple":
        return tuple(each())
    if tag == "immutable_list":
        return immutable_list(each())
    if tag == "size":
        return torch.Size(each())
    if tag in _DICTS:
        pairs = [(decode(k, where, nodes, depth + 1), decode(v, where, nodes, depth + 1)) for k, v in items]
        return _DICTS[tag](pairs)
    if tag == "slice" and len(items) == 3:
        return slice(*each())
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float" and raw in ("inf", "-inf", "nan"):
        return float(raw)
    if tag == "complex" and len(items) == 2:
        return complex(*each())
    if tag == "node" and nodes is not None and isinstance(raw, str) and raw in nodes:
        return nodes[raw]
    if tag == "fn":
        return allowlist.decode_target(raw, where)
    if tag in _ENUMS and isinstance(raw, str) and allowlist.IDENTIFIER.match(raw):
        value = getattr(torch, raw, None)
        if isinstance(value, _ENUMS[tag]):
            return value
    if tag == "device" and isinstance(raw, str) and len(raw) < 64:
        try:
            return torch.device(raw)
        except RuntimeError:
            pass
    raise OutputError(f"{where}: malformed {tag!r} value {str(raw)[:80]}")
