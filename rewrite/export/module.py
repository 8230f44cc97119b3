"""Write results: the rewritten module (generated code + safetensors weights + structure), report.json,
atomically into an output folder; and load a saved module back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors.torch import load_file, save_file

from ..errors import OutputError
from . import serialize

MODULE_DIR = "module"


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty folder unless ``force``; refuse a path that is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"--out {out} exists and is not empty; pass --force to replace it or choose another folder")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out``, on any failure it is removed,
    so no partial ``out`` is ever left behind and an existing ``out`` survives a failed run."""
    out = check_output_dir(out, force)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        yield staging
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.replace(out, backup / "old")
            os.replace(staging, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_module(gm: torch.fx.GraphModule, folder: str | Path) -> dict[str, str]:
    """Save ``gm`` under ``folder``: ``code.py`` (its generated code, for reading), ``weights.safetensors``
    (every parameter and buffer; tied tensors stored once and re-tied on load) and ``structure.pt``
    (the module with its tensors on the meta device). Returns the file paths by kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "code.py").write_text(gm.code)
    tensors, aliases = _unique_state(gm)
    save_file(tensors, str(folder / "weights.safetensors"), metadata={"aliases": json.dumps(aliases)})
    (folder / "structure.pt").write_bytes(serialize.dumps(copy_to_meta(gm)))
    return {"code": str(folder / "code.py"), "weights": str(folder / "weights.safetensors"),
            "structure": str(folder / "structure.pt")}


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, buffers and the plain tensor attributes a graph reads (export's lifted constants)."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
    if isinstance(module, torch.fx.GraphModule):
        registered = {name for name, _ in module.named_parameters(remove_duplicate=False)}
        registered |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
        for node in module.graph.nodes:
            if node.op == "get_attr" and str(node.target) not in registered:
                owner, _, attr = str(node.target).rpartition(".")
                value = getattr(module.get_submodule(owner), attr)
                if isinstance(value, torch.Tensor):
                    registered.add(str(node.target))
                    yield str(node.target), value


def _unique_state(gm: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor once (safetensors refuses shared storage); tied names map to their owner."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner_of: dict[int, str] = {}
    for name, tensor in _named_tensors(gm):
        if id(tensor) in owner_of:
            aliases[name] = owner_of[id(tensor)]
            continue
        owner_of[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous().cpu().clone()
    return tensors, aliases


def copy_to_meta(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` whose parameters and buffers live on the meta device (no data)."""
    import copy

    memo: dict[int, Any] = {}
    for _, tensor in _named_tensors(gm):
        if id(tensor) not in memo:
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(gm, memo)


def load_module(folder: str | Path, device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """Load a module written by ``save_module`` (or an ``--out`` folder): structure, then weights, with
    tied parameters tied again. Returns a trainable GraphModule on ``device``."""
    folder = Path(folder)
    if (folder / MODULE_DIR).is_dir():
        folder = folder / MODULE_DIR
    for needed in ("structure.pt", "weights.safetensors"):
        if not (folder / needed).exists():
            raise OutputError(f"{folder} has no {needed}; pass an effcompile --out folder or its module/ folder")
    gm = serialize.loads((folder / "structure.pt").read_bytes())
    from safetensors import safe_open

    with safe_open(str(folder / "weights.safetensors"), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(folder / "weights.safetensors"), device=str(device))
    state = dict(tensors)
    for alias, owner in aliases.items():
        state[alias] = tensors[owner]
    missing = set(gm.load_state_dict(state, assign=True, strict=False).missing_keys)
    for name in list(missing):
        if name in state:  # a plain tensor attribute (export constant), not a parameter or buffer
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner)
            if attr in module._buffers:
                module._buffers[attr] = state[name]
            else:
                setattr(module, attr, state[name])
            missing.discard(name)
    if missing:
        raise OutputError(f"{folder}: weights.safetensors lacks {sorted(missing)[:3]}; the folder is damaged, "
                          "write it again with effcompile --out")
    _retie(gm, aliases)
    return gm


def _retie(gm: torch.nn.Module, aliases: dict[str, str]) -> None:
    for alias, owner in aliases.items():
        owner_module, _, owner_attr = owner.rpartition(".")
        alias_module, _, alias_attr = alias.rpartition(".")
        value = getattr(gm.get_submodule(owner_module), owner_attr)
        target = gm.get_submodule(alias_module)
        if isinstance(value, torch.nn.Parameter):
            target._parameters[alias_attr] = value
        else:
            target._buffers[alias_attr] = value


def write_report(report_json: str, folder: str | Path) -> str:
    """Write ``report.json`` into ``folder``; returns its path."""
    path = Path(folder) / "report.json"
    path.write_text(report_json)
    return str(path)
