"""``effcompile``: parse the command line, run the road (spec → capture → passes → verify → emit),
print the report, exit with a clear code (0 ok, 1 verification failed, 2 bad input)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OptionError
from .common import (
    ArgumentParser,
    configure_logging,
    console,
    parse_device,
    progress_printer,
    run_guarded,
    spec_to_device,
)

EXPORT_KINDS = ("onnx", "onnx-eval")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the main command (``effcompile MODEL ...``)."""
    parser = ArgumentParser(
        prog="effcompile",
        description="Capture a PyTorch model as a torch.fx graph, rewrite it with verified passes, export it. "
                    "`effcompile train ...` trains a compiled model (see `effcompile train --help`).")
    parser.add_argument("model", nargs="?", help="a model file defining build_model()/model and example_inputs(), "
                        "or hf:<model_type> (hf:gpt2, hf:llama, hf:bert, ...)")
    parser.add_argument("--passes", default=None, help="comma-separated passes to run in order (see --list-passes)")
    parser.add_argument("--set", dest="set_options", action="append", default=[], metavar="PASS.OPTION=VALUE",
                        help="a pass option, e.g. --set remat.budget=0.5 (repeatable)")
    parser.add_argument("--config", help="a TOML file: `passes = [...]` and one [pass] table of options each")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Hugging Face config field, e.g. --model-arg n_layer=2 (repeatable)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of hf: example inputs (default 2; ≥ 1)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length of hf: example inputs (default 32)")
    parser.add_argument("--capture", default="auto", choices=("auto", "symbolic_trace", "export"),
                        help="capture path (default auto: symbolic_trace, falling back to torch.export)")
    parser.add_argument("--static-batch", action="store_true",
                        help="export at the example batch size only (faster capture; default: dynamic batch)")
    parser.add_argument("--out", help="write report.json, the rewritten module and exports here")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder that effcompile wrote (a folder without its effcompile.json marker is never replaced)")
    parser.add_argument("--export", action="append", default=[], choices=EXPORT_KINDS,
                        help="also export: onnx (ORT training artifacts), onnx-eval (inference model only)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate baked into the ORT optimizer (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay for ORT (default 0)")
    parser.add_argument("--no-verify", action="store_true", help="skip numerical verification after each pass")
    parser.add_argument("--max-error", type=float, default=None,
                        help="fail an approximate pass whose relative output error exceeds this")
    parser.add_argument("--device", default="cpu", help="device to capture and run on (cpu, cuda, ...)")
    parser.add_argument("--list-passes", action="store_true", help="list passes with their options and exit")
    parser.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    parser.add_argument("--progress", action="store_true", help="print a line per finished stage (capture, analysis, "
                        "each pass, verification, save, export) on stderr even when it is not a terminal or with "
                        "--json (default: only on a terminal, not with --json)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``effcompile`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        configure_logging("--debug" in argv)
        return run_guarded(lambda: _train(argv[1:]), "--debug" in argv)
    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    return run_guarded(lambda: _main(args), args.debug)


def _train(argv: list[str]) -> int:
    try:
        from . import train as train_cli
    except ImportError as error:  # pragma: no cover - shipped with the package
        raise OptionError(f"effcompile train is not available ({error})") from error
    return train_cli.main(argv)


def _list_passes() -> int:
    from rich.table import Table

    from ..pass_manager import describe_passes

    table = Table(title="effcompile passes")
    for column in ("pass", "kind", "summary", "options (default)"):
        table.add_column(column)
    for row in describe_passes():
        options = "\n".join(f"{o['name']}={o['default']!r} ({o['type']}){': ' + o['help'] if o['help'] else ''}"
                            for o in row["options"]) or "-"
        table.add_row(row["name"], "exact" if row["exact"] else "approximate", row["summary"], options)
    console().print(table)
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.list_passes:
        return _list_passes()
    if not args.model:
        raise OptionError("no model given; run e.g. `effcompile examples/gpt.py --passes identity` "
                          "or `effcompile --list-passes`")
    _check_arguments(args)
    passes, file_options = passes_and_file_options(args)
    if args.out:  # refuse a bad --out before doing any work, and hold it until the run ends
        from ..export.folder import OutputClaim

        inputs = [p for p in (args.model, args.config) if p and Path(p).exists()]
        with OutputClaim(args.out, args.force, protect=inputs) as claim:
            return _run(args, passes, file_options, claim)
    return _run(args, passes, file_options, None)


def _run(args: argparse.Namespace, passes: list[str], file_options: dict[str, Any], claim: Any) -> int:
    from .. import compile as compile_model
    from ..options import merge_options, parse_set_options
    from ..report import render
    from ..spec import resolve_spec

    options = merge_options(file_options, parse_set_options(args.set_options))
    device = parse_device(args.device)
    progress = progress_printer(args.progress, quiet=args.json)
    spec = resolve_spec(args.model, args.model_arg, args.batch or 2, args.seq or 32)
    if device.type != "cpu":
        spec = spec_to_device(spec, device)
    result = compile_model(spec, passes=passes, options=options, verify=not args.no_verify,
                           max_error=args.max_error, capture_path=args.capture,
                           dynamic_batch=not args.static_batch, progress=progress)
    if claim is not None:
        _write(result, args, claim, progress)
    if args.json:
        print(result.report.to_json())
    else:
        render(result.report, console())
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse flags that make no sense together before any work starts."""
    for flag, value in (("--batch", args.batch), ("--seq", args.seq)):
        if value is not None and value < 1:
            raise OptionError(f"{flag} {value} must be a positive integer")
        if value is not None and not args.model.startswith("hf:"):
            raise OptionError(f"{flag} sizes the example inputs of hf: models only; a model file's "
                              "example_inputs() sets its shapes")
    if args.export and not args.out:
        raise OptionError(f"--export {args.export[0]} writes into the output folder; add --out DIR")
    if not (0 < args.lr < math.inf) or not (0 <= args.weight_decay < math.inf):
        raise OptionError(f"--lr {args.lr} and --weight-decay {args.weight_decay} must be finite, the learning rate "
                          "> 0 and the weight decay ≥ 0; use e.g. --lr 1e-3 --weight-decay 0.01")
    from ..api import check_max_error

    check_max_error(args.max_error, not args.no_verify)


def passes_and_file_options(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The pass names (``--passes`` wins over the config file's ``passes``) and the config file's options."""
    from ..options import load_config_file, split_passes

    passes = split_passes(args.passes)
    file_options: dict[str, Any] = {}
    if args.config:
        data = load_config_file(args.config)
        file_passes = data.pop("passes", None)
        if file_passes is not None and args.passes is None:
            if not isinstance(file_passes, list) or not all(isinstance(p, str) and p for p in file_passes):
                raise OptionError(f"{args.config}: passes must be a list of pass names, e.g. passes = [\"remat\"]")
            passes = list(file_passes)
        file_options = data
    return passes, file_options


def _write(result: Any, args: argparse.Namespace, claim: Any, progress: Any) -> None:
    from ..export.module import save_module, write_report
    from ..progress import stage

    with claim.staging() as staging:
        with stage(progress, "save") as note:
            save_module(result.module, staging / "module")
            note.detail = str(Path(args.out) / "module")
        result.report.exports["module"] = str(Path(args.out) / "module")
        for kind in args.export:
            with stage(progress, f"export {kind}"):
                result.report.exports[kind] = _export(kind, result, staging, args)
        write_report(result.report.to_json(), staging)


def _export(kind: str, result: Any, staging: Path, args: argparse.Namespace) -> str:
    try:
        from ..export import onnx as onnx_export
    except ImportError as error:
        raise OptionError(f"--export {kind} needs onnx and onnxruntime-training ({error}); "
                          "pip install 'effcompile[ort]'") from error
    folder = staging / "onnx"
    if kind == "onnx":
        onnx_export.export_training_artifacts(result.program, folder, lr=args.lr, weight_decay=args.weight_decay)
    else:
        onnx_export.export_eval_model(result.program, folder)
    return str(Path(args.out) / "onnx")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
