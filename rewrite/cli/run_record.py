"""What a training log folder records about its model, so that ``effcompile train LOGDIR --resume`` can
rebuild it: ``run.json``, plain JSON (no pickle, no code).

It holds the MODEL as given to ``effcompile train`` (a model file or a compiled folder as an absolute path,
or ``hf:<type>``), ``--model-arg``, ``--passes``, ``--set``, ``--capture``, ``--backend``, and the data and
shape options (``--data`` as an absolute path or ``stdlib``, ``--max-bytes``, ``--val-fraction``,
``--seed``, ``--batch``, ``--seq``). Resuming rebuilds the model from these (a model file it names runs
again, as it did on the first run, so the file must still be there; a record naming a relative path or a
file inside the log folder is refused: a folder someone sent cannot bring the code it runs), then loads the
checkpoint's weights and state. Flags given on the resuming command line win over the record where they
differ from their defaults (``--steps 3000`` extends a run); the model-defining ones cannot be given again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import OptionError, SpecError, UnsafeFolderError
from ..train.config import RUN_FILES, RUN_RECORD

FORMAT = 1
#: Options that define the model: recorded, never given again when resuming a log folder.
MODEL_OPTIONS = ("model_arg", "passes", "set_options", "capture")
#: Options recorded for the data stream and the shapes: the record's value is used unless given.
RUN_OPTIONS = ("backend", "data", "max_bytes", "val_fraction", "seed", "batch", "seq")


def is_log_folder(path: str) -> bool:
    """True if ``path`` is a folder holding a training run (its log, checkpoint, summary or record)."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def write_run_record(args: argparse.Namespace, batch: int, seq: int) -> Path:
    """Write ``run.json`` into ``args.out`` (created if needed) for this run; returns its path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model if args.model.startswith("hf:") else str(Path(args.model).resolve())
    data = args.data if args.data == "stdlib" else str(Path(args.data).resolve())
    record = {"format": FORMAT, "model": model, "model_arg": list(args.model_arg), "passes": args.passes or "",
              "set_options": list(args.set_options), "capture": args.capture, "backend": args.backend,
              "data": data, "max_bytes": args.max_bytes, "val_fraction": args.val_fraction, "seed": args.seed,
              "batch": batch, "seq": seq}
    path = out / RUN_RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def resume_from_log_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """When MODEL is a log folder: check the flags and fill ``args`` from its ``run.json`` (in place), so the
    run continues with the model, data and shapes it started with. Raises OptionError for a log folder
    without ``--resume``, another ``--out`` or a model-defining flag, SpecError for a missing or unreadable
    record. Does nothing for any other MODEL."""
    if not is_log_folder(args.model):
        return
    folder = Path(args.model)
    if not args.resume and any((folder / name).exists() for name in ("module", "onnx", "report.json")):
        return  # also a compiled folder: train it (a run may have logged into it)
    if not args.resume:
        raise OptionError(f"{folder} is a training log folder; continue its run with `effcompile train {folder} "
                          "--resume`, or name the model to train (a model file, hf:<type> or a compiled folder)")
    if args.out and Path(args.out).resolve() != folder.resolve():
        raise OptionError(f"--resume continues the run in its own folder; use --out {folder} or leave --out out")
    given = [f"--{name.replace('_options', '').replace('_', '-')}" for name in MODEL_OPTIONS
             if getattr(args, name) != parser.get_default(name)]
    if given:
        raise OptionError(f"{', '.join(given)} cannot change when resuming {folder}: its run.json records the "
                          "model; drop them (or start a new run with --force)")
    record = _read(folder)
    args.out, args.model = str(folder), record["model"]
    for name in MODEL_OPTIONS:
        setattr(args, name, record[name])
    for name in RUN_OPTIONS:
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, record[name])


def _read(folder: Path) -> dict[str, Any]:
    path = folder / RUN_RECORD
    if not path.exists():
        raise SpecError(f"{folder} holds a training run but no {RUN_RECORD} (an older effcompile wrote it); resume "
                        f"it by naming its model: effcompile train MODEL --resume --out {folder}")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SpecError(f"{path} cannot be read ({type(error).__name__}); resume by naming the model: "
                        f"effcompile train MODEL --resume --out {folder}") from None
    expected = {"model": str, "model_arg": list, "passes": str, "set_options": list, "capture": str}
    if not isinstance(record, dict) or record.get("format") != FORMAT or any(
            not isinstance(record.get(key), kind) for key, kind in expected.items()) or any(
            key not in record for key in RUN_OPTIONS):
        raise SpecError(f"{path} is not a run record this effcompile writes (format {FORMAT}); resume by naming "
                        f"the model: effcompile train MODEL --resume --out {folder}")
    _check_model_outside(folder, path, record["model"])
    return record


def _check_model_outside(folder: Path, path: Path, model: str) -> None:
    """A model file the record names runs when the run resumes, so it must be one this machine already has: an
    absolute path outside the log folder. A folder someone sent cannot bring the code it runs."""
    if model.startswith("hf:"):
        return
    if not Path(model).is_absolute():
        raise SpecError(f"{path} names the model {model!r}, not an absolute path as effcompile writes it; resume "
                        f"by naming the model: effcompile train MODEL --resume --out {folder}")
    target, home = Path(model).resolve(), folder.resolve()
    if home in target.parents and not target.is_dir():  # a compiled folder is loaded as data; a file runs
        raise UnsafeFolderError(f"{path} names the model {model}, inside the log folder itself; resuming runs no "
                                f"code from the folder: check the file and name it yourself: effcompile train "
                                f"MODEL --resume --out {folder}")
