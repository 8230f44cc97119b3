"""``python -m tools.zoo {run,one,table,list}``: see ``tools/zoo/__init__.py``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "build" / "zoo" / "results.jsonl"


def _parser() -> argparse.ArgumentParser:
    from .checks import CHECKS

    parser = argparse.ArgumentParser(prog="python -m tools.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run checks over the zoo (resumable)")
    one = sub.add_parser("one", help="build one architecture and print its results as JSON lines")
    one.add_argument("archs", nargs="+", help="architecture keys (hf:vit, hf:bert:causal-lm, vendored:mingpt)")
    one.add_argument("--timeout", type=float, default=0, help="seconds per architecture (0: none)")
    for command in (run, one):
        command.add_argument("--checks", default=",".join(CHECKS),
                             help=f"comma-separated checks (default all: {', '.join(CHECKS)})")
    run.add_argument("--only", default="", help="comma-separated keys or model types (hf:vit, gpt2, vendored:mingpt)")
    run.add_argument("--modality", choices=("text", "vision", "audio"), help="only this modality")
    run.add_argument("--every", type=int, default=1, help="every n-th architecture (a sample)")
    run.add_argument("--shard", help="k/n: every n-th architecture from the k-th (after --every)")
    run.add_argument("--jobs", type=int, default=1, help="child processes at a time")
    run.add_argument("--per-process", type=int, default=1,
                     help="architectures per child process (default 1: each isolated; more saves the imports)")
    run.add_argument("--timeout", type=float, default=1800, help="seconds per architecture (default 1800)")
    run.add_argument("--results", type=Path, default=RESULTS, help=f"JSONL results file (default {RESULTS})")
    run.add_argument("--redo", action="store_true", help="run again what the results file already has")
    table = sub.add_parser("table", help="write docs/conformance.md and the README summary from the results")
    table.add_argument("--results", type=Path, default=RESULTS)
    table.add_argument("--out", type=Path, default=ROOT / "docs" / "conformance.md")
    table.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose summary to update")
    table.add_argument("--no-readme", action="store_true", help="leave the README as it is")
    sub.add_parser("list", help="list the architectures")
    return parser


def _select(args: argparse.Namespace) -> list:
    from .catalog import all_architectures
    from .runner import select_shard

    archs = all_architectures()
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        archs = [a for a in archs if a.key in wanted or a.model_type in wanted or a.key.split(":", 1)[1] in wanted]
    if args.modality:
        archs = [a for a in archs if a.modality == args.modality]
    return select_shard(archs[::max(1, args.every)], args.shard)


def _checks(text: str) -> list[str]:
    from .checks import CHECKS

    # "lora,amp,remat" is one check: match the longest known names first
    names, rest = [], text
    while rest:
        match = max((c for c in CHECKS if rest == c or rest.startswith(c + ",")), key=len, default=None)
        if match is None:
            raise SystemExit(f"unknown check in {text!r}; known: {', '.join(CHECKS)}")
        names.append(match)
        rest = rest[len(match) + 1:]
    return names


def _quiet() -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()


def _one(args: argparse.Namespace) -> int:
    _quiet()
    import signal

    from .catalog import arch_from_key

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"timed out after {args.timeout:.0f} s (the zoo's per-architecture limit)")

    signal.signal(signal.SIGALRM, expired)
    for key in args.archs:
        signal.alarm(int(args.timeout) if args.timeout else 0)
        try:
            _run_arch(arch_from_key(key), _checks(args.checks))
        except TimeoutError as error:  # reported by _run_arch when it can; a timeout between checks lands here
            print(json.dumps({"kind": "timeout", "arch": key, "message": str(error)}), flush=True)
        finally:
            signal.alarm(0)
    return 0


def _run_arch(arch, checks: list[str]) -> None:
    from .build import build
    from .checks import Context, run_check

    started = time.perf_counter()
    row = {"kind": "build", "arch": arch.key, "modality": arch.modality, "class_name": arch.class_name}
    try:
        built = build(arch)
    except Exception as error:  # the build's own error lists every level
        print(json.dumps({**row, "error": f"{type(error).__name__}: {error}"[:2000],
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
        return
    print(json.dumps({**row, "level": built.level, "parameters": built.parameters, "command": built.command(),
                      "tries": built.tries, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    context = Context(built.spec)
    for check in checks:
        result = run_check(context, check)
        print(json.dumps({"kind": "check", "arch": arch.key, "modality": arch.modality, **result.to_dict()},
                         default=str), flush=True)
        if result.details.get("type") == "TimeoutError":
            break  # the architecture's time is spent: the remaining checks stay pending for a rerun


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed, its ``--checks`` known (SystemExit naming an unknown flag or check)."""
    args = _parser().parse_args(argv)
    if getattr(args, "checks", None) is not None:
        _checks(args.checks)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    if args.command == "one":
        return _one(args)
    if args.command == "list":
        from .catalog import all_architectures

        for arch in all_architectures():
            print(f"{arch.key:45s} {arch.modality:7s} {arch.class_name}")
        return 0
    if args.command == "table":
        from .table import write_table

        write_table(args.results, args.out, None if args.no_readme else args.readme)
        print(f"wrote {args.out}")
        return 0
    from .runner import run

    count = run(_select(args), _checks(args.checks), args.results, args.jobs, args.timeout, args.redo, ROOT,
                per_process=args.per_process, progress=lambda line: print(line, flush=True))
    print(f"ran {count} architecture(s); results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
