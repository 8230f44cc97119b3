"""``effcompile train``: build or load a model, compile it with the chosen passes, and train it on a
byte-level corpus with a progress bar (loss, tokens/s), periodic validation, checkpoints and a JSON log.

    effcompile train hf:gpt2 --model-arg n_layer=6 --steps 500 --data stdlib --aga --lclr --out runs/a
    effcompile train out/ --steps 100 --out runs/a                   # a folder written by effcompile --out
    effcompile train runs/a --resume --steps 200                      # continue the run logged in runs/a
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OptionError, SpecError
from ..options import split_passes
from ..train.config import LOSS_CURVE, LOSS_PLOT, RUN_FILES, STEP_LOG
from .common import ArgumentParser, console, parse_device, progress_printer, spec_to_device
from .run_record import resume_from_log_folder, write_run_record

log = logging.getLogger(__name__)
# What marks a folder (or its module/) written by `effcompile --out`; structure.pt is the old pickle
# format, routed to load() so that it is refused with the way to re-create it.
_SAVED_ENTRIES = ("module", "structure.json", "structure.pt")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``effcompile train``."""
    from ..train import OPTIMIZERS, TrainConfig

    defaults = TrainConfig()
    parser = ArgumentParser(
        prog="effcompile train",
        description="Train a model (a model file, hf:<type>, or a folder written by `effcompile --out`) on a "
                    "byte-level corpus (the Python standard library's sources by default).")
    parser.add_argument("model", help="model file, hf:<model_type>, an effcompile --out folder, or a training log "
                        "folder to continue with --resume")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--data", default="stdlib", help="stdlib (the Python standard library's .py files), "
                        "a text file, or a folder of text files (default stdlib)")
    parser.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of data")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of files held out (default 0.05)")
    parser.add_argument("--passes", default="", help="comma-separated passes to compile with (model files, hf:)")
    parser.add_argument("--set", dest="set_options", action="append", default=[], metavar="PASS.OPTION=VALUE",
                        help="a pass option, e.g. --set amp.dtype=bfloat16 (repeatable)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Hugging Face config field (vocab_size=256 is added for hf: models)")
    parser.add_argument("--capture", default="auto", choices=("auto", "symbolic_trace", "export"))
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"base learning rate (default {defaults.lr})")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="global norm clip (0: off)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps")
    parser.add_argument("--schedule", default=defaults.schedule, choices=("constant", "cosine"),
                        help="LR after warm-up when --lclr is off")
    parser.add_argument("--lclr", action="store_true", help="layer-wise cosine LR: η·γ^(ℓ/L)·(1+cos πt/T)/2")
    parser.add_argument("--lclr-gamma", type=float, default=defaults.lclr_gamma, help="γ (head LR / embedding LR)")
    parser.add_argument("--accum", type=int, default=defaults.accum, help="micro-batches per step (AGA's start)")
    parser.add_argument("--aga", action="store_true", help="adaptive gradient accumulation N=⌈α·σ²/ε²⌉")
    parser.add_argument("--aga-alpha", type=float, default=defaults.aga_alpha, help="α (default 1)")
    parser.add_argument("--aga-relative", action="store_true",
                        help="ε as a fraction of the gradient RMS: N follows the gradient noise scale")
    parser.add_argument("--aga-epsilon", type=float, default=None, help="ε (default: calibrated so N starts at --accum)")
    parser.add_argument("--max-accum", type=int, default=defaults.max_accum, help="upper clamp of N (default 16)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (default 8, or the "
                        "model file's example batch)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128, or the model "
                        "file's example length)")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--target-loss", type=float, default=None, help="stop when validation loss ≤ this")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this much training time")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", help="log folder: log.jsonl (one line per step), summary.json, checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--force", action="store_true", help="start over in a --out folder that holds a run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", default=defaults.compile, choices=("auto", "on", "off"),
                        help="torch.compile the module: auto (when its execution plan says so, e.g. chosen by "
                             "--passes auto), on, off")
    parser.add_argument("--autocast", default=defaults.autocast, choices=("off", "bfloat16", "float16"),
                        help="run under torch.autocast (for models compiled without amp)")
    parser.add_argument("--log-every", type=int, default=defaults.log_every,
                        help=f"read the loss back every k steps (default {defaults.log_every}; no host sync between)")
    parser.add_argument("--prefetch", type=int, default=defaults.prefetch, help="batches prepared ahead (default 2)")
    parser.add_argument("--backend", default="torch", choices=("torch", "ort"),
                        help="torch, or ort (ONNX Runtime training artifacts of an --out folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no stage lines")
    parser.add_argument("--progress", action="store_true", help="a line per finished compile stage on stderr even "
                        "when it is not a terminal")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``effcompile train``. Returns the exit code; raises EffcompileError for bad input
    (the main CLI prints it as one line and exits 2)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    resume_from_log_folder(args, parser)
    _check_arguments(args)
    if args.resume and not args.out:
        raise OptionError("--resume needs --out LOGDIR (the folder holding the checkpoint)")
    run = _train_ort if args.backend == "ort" else _train_torch
    if not args.out:
        return run(args)
    from ..export.folder import claim_log_dir

    # effcompile's own run folders only (marker), one run at a time (lock held until the run ends)
    with claim_log_dir(args.out, args.force, args.resume, RUN_FILES):
        return run(args)


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse sizes below 1 and an empty pass name before any work (``TrainConfig`` checks the rest)."""
    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--max-bytes", args.max_bytes)):
        if value is not None and value < 1:
            raise OptionError(f"train: {flag} {value} must be a positive integer")
    split_passes(args.passes or None)


def _is_saved_folder(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and any((folder / name).exists() for name in _SAVED_ENTRIES + ("onnx",))


def _build(args: argparse.Namespace, device: Any) -> tuple[Any, int, int, Any]:
    """The thing to train (CompileResult or loaded module), the micro-batch and sequence sizes, and the
    example inputs to feed a loaded module like (None: the CompileResult's own)."""
    import torch
    from torch.utils import _pytree as pytree

    from .. import compile as compile_model
    from .. import load
    from ..options import parse_set_options
    from ..spec import parse_model_args, resolve_spec
    from ..train.inputs import token_shape

    passes = split_passes(args.passes or None)
    if _is_saved_folder(args.model):
        if passes or args.set_options or args.model_arg:
            raise OptionError(f"{args.model} is an already compiled folder; --passes/--set/--model-arg apply to "
                              "model files and hf: types only")
        if not any((Path(args.model) / name).exists() for name in _SAVED_ENTRIES):
            raise SpecError(f"{args.model} holds no module/ folder (only ONNX artifacts); use --backend ort")
        example = compiled_example_inputs(args.model)
        shape = token_shape((), example) if isinstance(example, dict) else token_shape(example or ())
        batch, seq = args.batch or (shape[0] if shape else 8), args.seq or (shape[1] if shape else 128)
        return load(args.model, device), batch, seq, example
    batch, seq = args.batch or 8, args.seq or 128
    model_args = list(args.model_arg)
    if args.model.startswith("hf:"):
        given = parse_model_args(model_args)
        vocab = given.get("vocab_size")
        if vocab is None:
            model_args.append("vocab_size=256")
        elif not isinstance(vocab, int) or vocab < 256:
            raise SpecError(f"--model-arg vocab_size={vocab} is below 256; the byte-level corpus needs vocab_size=256")
        spec = resolve_spec(args.model, model_args, max(batch, 2), seq)
    else:
        spec = resolve_spec(args.model, model_args)
        tokens = [t for t in pytree.tree_leaves((spec.args, spec.kwargs))
                  if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()]
        if tokens:
            batch, seq = args.batch or int(tokens[0].shape[0]), args.seq or int(tokens[0].shape[1])
    if device.type != "cpu":
        spec = spec_to_device(spec, device)
    result = compile_model(spec, passes=passes, options=parse_set_options(args.set_options),
                           capture_path=args.capture, measure=False,
                           progress=progress_printer(args.progress, quiet=args.quiet))
    return result, batch, seq, None


def _config(args: argparse.Namespace, batch: int, seq: int) -> Any:
    from ..train import TrainConfig

    return TrainConfig(
        steps=args.steps, batch=batch, seq=seq, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, warmup=args.warmup, schedule=args.schedule, lclr=args.lclr,
        lclr_gamma=args.lclr_gamma, accum=args.accum, aga=args.aga, aga_alpha=args.aga_alpha,
        aga_epsilon=args.aga_epsilon, aga_relative=args.aga_relative, max_accum=args.max_accum, eval_every=args.eval_every,
        eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every, target_loss=args.target_loss,
        max_train_seconds=args.max_seconds, seed=args.seed, compile=args.compile, autocast=args.autocast,
        log_every=args.log_every, prefetch=args.prefetch)


class _Progress:
    """A rich progress bar showing loss, validation loss, N and tokens/s; validation lines printed above it."""

    def __init__(self, total: int, start: int, quiet: bool, max_seconds: float | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = None if quiet else Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=self.console)
        self.task = None
        self.total, self.start, self.max_seconds = total, start, max_seconds
        self.val: float | None = None

    def __enter__(self) -> _Progress:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            self.val = record["val_loss"]
            self.console.print(f"step {record['step'] + 1}: val_loss {self.val:.4f}  tokens {record['tokens']:,}",
                               highlight=False)
        if self.progress is None:
            return
        info = f"loss {record['loss']:.4f}"
        if self.val is not None:
            info += f"  val {self.val:.4f}"
        info += f"  N {record.get('accum', 1)}  {record['tokens_per_s']:,.0f} tok/s"
        if "peak_mem_bytes" in record:
            info += f"  {record['peak_mem_bytes'] / 2**30:.2f} GiB"
        info += f"  ETA {_clock(eta_seconds(record, self.total, self.max_seconds))}"
        self.progress.update(self.task, completed=record["step"] + 1, info=info)


def eta_seconds(record: dict[str, Any], total_steps: int, max_seconds: float | None) -> float:
    """Seconds of training left after ``record``'s step: the remaining steps at the recent step time, or
    the time limit's remainder when that comes first."""
    left = (total_steps - record["step"] - 1) * record.get("step_s", 0.0)
    if max_seconds is not None:
        left = min(left, max(0.0, max_seconds - record.get("train_s", 0.0)))
    return max(0.0, left)


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def _print_summary(summary: dict[str, Any], out: str | None) -> None:
    from rich.table import Table

    table = Table(title="effcompile train")
    table.add_column("")
    table.add_column("value")
    rows = [("steps", summary["steps"]), ("tokens", f"{summary['tokens']:,}"),
            ("train seconds", f"{summary['train_seconds']:.1f}"),
            ("final validation loss", "-" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4f}")]
    if summary.get("target_reached"):
        hit = summary["target_reached"]
        rows.append(("target reached", f"step {hit['step']}, {hit['tokens']:,} tokens, {hit['train_s']:.1f} s"))
    if out:
        rows.append(("log", str(Path(out) / STEP_LOG)))
        rows.append(("loss curve", ", ".join(str(Path(out) / name) for name in (LOSS_CURVE, LOSS_PLOT)
                                               if (Path(out) / name).exists())))
    for key, value in rows:
        table.add_row(key, str(value))
    console(120).print(table)


def _train_torch(args: argparse.Namespace) -> int:
    from ..train.data import check_max_bytes, check_source, load_corpus

    device = parse_device(args.device)
    check_source(args.data)
    model, batch, seq, example = _build(args, device)
    config = _config(args, batch, seq)
    check_max_bytes(args.max_bytes, seq, args.val_fraction)
    corpus = load_corpus(args.data, args.val_fraction, args.seed, args.max_bytes)
    return _run(model, corpus, config, args, example)


def compiled_example_inputs(folder: str) -> tuple | dict[str, Any] | None:
    """Zero tensors shaped like the example inputs a folder written by ``effcompile --out`` was compiled on
    (recorded in its ``report.json``): a tuple of positional or a dict of keyword inputs, as ``train()``'s
    ``example_inputs`` takes them; None when the report does not record them (or records both kinds)."""
    import torch

    def make(described: Any) -> Any:
        if described is None:
            return None
        dtype, shape = getattr(torch, described["dtype"]), described["shape"]
        if not isinstance(dtype, torch.dtype) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"not a recorded input: {described}")  # report.json is data: no other attribute
        return torch.zeros(shape, dtype=dtype)

    try:
        recorded = json.loads((Path(folder) / "report.json").read_text())["model"]["example_inputs"]
        args, kwargs = tuple(make(d) for d in recorded["args"]), {k: make(d) for k, d in recorded["kwargs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
    return None if args and kwargs else (args or kwargs or None)


def _train_ort(args: argparse.Namespace) -> int:
    """Train ONNX Runtime training artifacts: AdamW as exported, the LR schedule applied per step."""
    from ..train import OrtBackend
    from ..train.backends import exported_shape
    from ..train.data import check_max_bytes, load_corpus

    unsupported = [flag for flag, on in (("--aga", args.aga), ("--lclr", args.lclr), ("--passes", args.passes),
                                         ("--optimizer " + args.optimizer, args.optimizer != "adamw"),
                                         ("--accum", args.accum != 1)) if on]
    if unsupported:
        raise OptionError(f"{', '.join(unsupported)} not available with --backend ort (its optimizer and graph "
                          "are fixed at export); drop them or use --backend torch")
    folder = _ort_folder(args.model)
    export_batch, export_seq = exported_shape(folder)
    config = _config(args, args.batch or export_batch or 8, args.seq or export_seq or 128)
    check_max_bytes(args.max_bytes, config.seq, args.val_fraction)
    backend = OrtBackend(folder, config, device="cuda" if args.device.startswith("cuda") else "cpu")
    corpus = load_corpus(args.data, args.val_fraction, args.seed, args.max_bytes)
    return _run(backend, corpus, config, args)


def saved_execution(folder: str) -> Any:
    """The execution plan (``ExecutionPlan``) recorded in an ``effcompile --out`` folder's ``report.json`` by a
    pass such as ``auto``, or None (no folder, no report, no plan)."""
    from ..plans import ExecutionPlan

    report = Path(folder) / "report.json"
    if not _is_saved_folder(folder) or not report.exists():
        return None
    try:
        data = json.loads(report.read_text()).get("execution")
    except (OSError, ValueError):
        return None
    return ExecutionPlan.from_dict(data) if isinstance(data, dict) else None


def _run(model: Any, corpus: Any, config: Any, args: argparse.Namespace, example_inputs: Any = None) -> int:
    """Train ``model`` (a compiled model or a backend) with a progress bar; print the summary."""
    from ..train import Trainer

    trainer = Trainer(model, corpus, config, log_dir=args.out, example_inputs=example_inputs,
                      execution=saved_execution(args.model))
    if args.out:
        write_run_record(args, config.batch, config.seq)
    if args.resume:
        trainer.load_checkpoint()
    with _Progress(config.steps, trainer.step, args.quiet, config.max_train_seconds) as progress:
        result = trainer.run(progress)
    _print_summary(result.to_dict(), args.out)
    return 0


def _ort_folder(model: str) -> Path:
    from ..export.onnx import MANIFEST

    folder = Path(model)
    for candidate in (folder / "onnx", folder):
        if (candidate / MANIFEST).exists():
            return candidate
    raise SpecError(f"--backend ort needs a folder written by `effcompile MODEL --export onnx --out DIR`; "
                    f"{model} holds no onnx/{MANIFEST}")
