"""The saved module (``module/``): data only, loaded without running anything from the folder.

- ``structure.json``: ``{"format": "effcompile-module", "version": 1, "tensors": {name: {dtype, shape,
  parameter, requires_grad}}, "root": <module tree>}`` — the module tree, graphs and codegen as JSON
  (``structure``, ``graphs``, ``values``), every callable and class resolved against ``allowlist``;
- ``weights.safetensors``: each distinct tensor once under its table name (tied tensors are one entry
  that several modules name; loading ties them again);
- ``code.py``: the generated forward, for reading only (never imported).

Loading checks that the weights hold exactly the table's tensors with the table's dtypes and shapes.
A folder in the old pickle format (``structure.pt``) is refused (re-create it); so is anything off the
allow-list (``UnsafeFolderError``) and any damaged file (``OutputError``): one line, exit 2.
The output-folder protocol (marker, lock, atomic replace) lives in ``folder``; its ``check_output_dir``
and ``atomic_dir`` are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import EffcompileError, OutputError, UnsafeFolderError
from . import allowlist, graphs, structure, values
from .folder import atomic_dir, check_output_dir

__all__ = ["MODULE_DIR", "save_module", "load_module", "write_report", "atomic_dir", "check_output_dir"]

MODULE_DIR = "module"
STRUCTURE = "structure.json"
WEIGHTS = "weights.safetensors"
FORMAT = "effcompile-module"
VERSION = 1
_RECREATE = "re-create it with `effcompile MODEL --out DIR --force`"


def save_module(gm: torch.nn.Module, folder: str | Path) -> dict[str, str]:
    """Save ``gm`` under ``folder``: ``structure.json``, ``weights.safetensors`` and ``code.py``. Returns the
    file paths by kind. Raises OutputError naming the module/node/attribute that is not data (an
    unregistered effcompile class is an effcompile bug; the message says how to register it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        encoded = structure.encode_module(gm)
    except (values.NotEncodable, allowlist.NotAllowed) as error:
        raise OutputError(f"cannot save the module: {error}") from None
    table = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "parameter": isinstance(t, torch.nn.Parameter), "requires_grad": bool(t.requires_grad)}
             for name, t in encoded.tensors.items()}
    document = {"format": FORMAT, "version": VERSION, "torch": torch.__version__, "tensors": table,
                "root": encoded.root}
    (folder / STRUCTURE).write_text(json.dumps(document, allow_nan=False, separators=(",", ":")))
    tensors = {name: t.detach().contiguous().cpu().clone() for name, t in encoded.tensors.items()}
    try:
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT, "version": str(VERSION)})
    except SafetensorError as error:
        raise OSError(f"writing {WEIGHTS} failed: {str(error)[:200]}") from None
    code = gm.code if isinstance(gm, torch.fx.GraphModule) else ""
    (folder / "code.py").write_text("# effcompile: the generated forward, for reading only (never imported)\n" + code)
    return {"structure": str(folder / STRUCTURE), "weights": str(folder / WEIGHTS), "code": str(folder / "code.py")}


def load_module(folder: str | Path, device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """Load a module written by ``save_module`` (an ``--out`` folder or its ``module/``) onto ``device``.
    Runs nothing from the folder. Raises UnsafeFolderError (an old pickle folder, a name off the
    allow-list) or OutputError (missing or damaged files, tensors that disagree with the structure)."""
    folder = Path(folder)
    if (folder / MODULE_DIR).is_dir():
        folder = folder / MODULE_DIR
    if not (folder / STRUCTURE).exists():
        if (folder / "structure.pt").exists():
            raise UnsafeFolderError(f"{folder} was written by an older effcompile as a pickle (structure.pt), which "
                                    f"is not loaded because unpickling can run code; {_RECREATE}")
        raise OutputError(f"{folder} has no {STRUCTURE}; pass an effcompile --out folder or its module/ folder")
    try:
        document = graphs.as_dict(json.loads((folder / STRUCTURE).read_text()), STRUCTURE)
        if document.get("format") != FORMAT or document.get("version") != VERSION:
            raise OutputError(f"{folder / STRUCTURE} is not an effcompile module of format version {VERSION}; {_RECREATE}")
        tensors = _load_tensors(folder, graphs.as_dict(document.get("tensors"), "tensors"), device)
        module = structure.decode_module(document.get("root"), tensors)
    except EffcompileError as error:
        message = str(error) if STRUCTURE in str(error) or WEIGHTS in str(error) else f"{folder / STRUCTURE}: {error}"
        if "--force" not in message:
            message += f"; {_RECREATE} from a model you trust"
        raise type(error)(message) from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
            RuntimeError) as error:
        raise OutputError(f"{folder / STRUCTURE} is damaged ({type(error).__name__}: {str(error)[:160]}); "
                          f"{_RECREATE}") from None
    if not isinstance(module, torch.fx.GraphModule):
        raise OutputError(f"{folder / STRUCTURE}: the root is not a graph module; {_RECREATE}")
    return module


def _load_tensors(folder: Path, table: dict[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
    """The weights, checked against the structure's table (same names, dtypes, shapes); parameters as
    ``nn.Parameter`` with their ``requires_grad``. Raises OutputError."""
    path = folder / WEIGHTS
    if not path.exists():
        raise OutputError(f"{folder} has no {WEIGHTS}; {_RECREATE}")
    try:
        loaded = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise OutputError(f"{path} is damaged or truncated ({str(error)[:160]}); {_RECREATE}") from None
    missing, extra = sorted(set(table) - set(loaded)), sorted(set(loaded) - set(table))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"holds tensors the structure does not name: {extra[:3]}"
        raise OutputError(f"{path} {what}; the folder is damaged, {_RECREATE}")
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in table.items():
        spec = graphs.as_dict(spec, f"tensor {name}")
        tensor = loaded[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != spec.get("dtype") or list(tensor.shape) != spec.get("shape"):
            raise OutputError(f"{path}: tensor {name} is {dtype}{list(tensor.shape)} but the structure says "
                              f"{spec.get('dtype')}{spec.get('shape')}; the folder is damaged, {_RECREATE}")
        if spec.get("parameter"):
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(spec.get("requires_grad")))
        elif spec.get("requires_grad"):
            tensor.requires_grad_(True)
        tensors[name] = tensor
    return tensors


def write_report(report_json: str, folder: str | Path) -> str:
    """Write ``report.json`` into ``folder``; returns its path."""
    path = Path(folder) / "report.json"
    path.write_text(report_json)
    return str(path)
