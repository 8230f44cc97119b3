"""``torchrun --nproc-per-node K -m effcompile.cli.pipeline MODEL ...``: compile a model with the
``pipeline`` pass on every rank and train its stages on ``torch.distributed.pipelining``
(``effcompile.train.pipeline``). Rank 0 prints one JSON line per schedule; ``--dump`` writes each rank's
losses and gradients.

    torchrun --nproc-per-node 2 -m effcompile.cli.pipeline hf:gpt2 --model-arg n_layer=4 \\
        --stages 2 --schedule 1f1b --microbatches 4 --batch 8 --seq 64 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from ..errors import EffcompileError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m effcompile.cli.pipeline``."""
    parser = argparse.ArgumentParser(prog="python -m effcompile.cli.pipeline",
                                     description="Train a model split by the pipeline pass under torchrun.")
    parser.add_argument("model", help="hf:<type> or a model file (build_model, example_inputs, loss_fn)")
    parser.add_argument("--model-arg", action="append", default=[], help="config override key=value (hf: only)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--stages", type=int, default=None, help="default: the number of processes")
    parser.add_argument("--balance", default="flops")
    parser.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b or interleaved; comma-separated runs each")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="0: one forward/backward, gradients dumped")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (parameters)")
    parser.add_argument("--set", action="append", default=[], help="extra pipeline option, e.g. cut_slack=0.1")
    parser.add_argument("--verify", action="store_true", help="verify the composed stages on rank 0")
    parser.add_argument("--dump", default=None, help="folder: write rank<r>_<schedule>.pt (losses, grads)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``torchrun --nproc-per-node K -m effcompile.cli.pipeline MODEL ...``. Returns the exit
    code: 0, or the error's exit code (2 for bad input) after printing ``rank <r>: error: <message>``."""
    import torch
    import torch.distributed as dist

    from ..train.pipeline import init_distributed, run_pipeline

    options = build_parser().parse_args(argv)
    rank, world, device = init_distributed(options.device)
    try:
        compiled: dict[int, Any] = {}
        for schedule in options.schedule.split(","):
            pipeline_options = _pipeline_options(options, schedule, world)
            stages = pipeline_options["stages"]
            if stages not in compiled or options.steps > 0:  # training changes weights
                compiled[stages] = _compile(options, pipeline_options, rank, device)
            spec, result, program = compiled[stages]
            batch = (spec.args, spec.kwargs)
            outcome = run_pipeline(program, lambda _, batch=batch: batch, options.steps, device,
                                   schedule, options.microbatches, options.lr)
            if options.dump:
                os.makedirs(options.dump, exist_ok=True)
                torch.save(outcome, os.path.join(options.dump, f"rank{rank}_{schedule}.pt"))
            if rank == 0:
                print(json.dumps({"schedule": schedule, "stages": stages, "losses": outcome["losses"],
                                  "ms_per_step": 1000 * sum(outcome["seconds"][1:]) / max(len(outcome["seconds"]) - 1, 1),
                                  "summary": result.report.record("pipeline").details["summary"]}), flush=True)
            dist.barrier()
    except EffcompileError as error:
        print(f"rank {rank}: error: {error}", flush=True)
        return error.exit_code
    finally:
        dist.destroy_process_group()
    return 0


def _pipeline_options(options: argparse.Namespace, schedule: str, world: int) -> dict[str, Any]:
    per_rank = 2 if schedule == "interleaved" else 1
    extra = dict(pair.split("=", 1) for pair in options.set)
    return {"stages": options.stages or world * per_rank, "balance": options.balance, "schedule": schedule,
            "microbatches": options.microbatches, **extra}


def _compile(options: argparse.Namespace, pipeline_options: dict[str, Any], rank: int, device: Any
             ) -> tuple[Any, Any, Any]:
    """(spec, compile result, the program every rank agrees on) for one stage count."""
    import torch

    from .. import compile as compile_model
    from ..spec import resolve_spec
    from .common import spec_to_device

    spec = resolve_spec(options.model, options.model_arg, options.batch, options.seq)
    spec = spec_to_device(spec, device, getattr(torch, options.dtype))
    result = compile_model(spec, passes=["pipeline"], options={"pipeline": pipeline_options},
                           verify=rank == 0 and options.verify)
    return spec, result, _agree_on_cuts(result.program, spec, pipeline_options)


def _agree_on_cuts(program: Any, spec: Any, options: dict[str, Any]) -> Any:
    """All ranks must cut identically; if measured costs (balance=time) made them differ, every rank
    adopts rank 0's cuts (``split_before`` its stages' first nodes)."""
    import torch.distributed as dist

    from .. import compile as compile_model
    from ..train.pipeline import pipeline_plan

    firsts = pipeline_plan(program).first_nodes
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, firsts)
    if all(g == gathered[0] for g in gathered):
        return program
    if firsts != gathered[0]:
        cuts = tuple(gathered[0][1:])
        program = compile_model(spec, passes=["pipeline"], options={"pipeline": {**options, "split_before": cuts}},
                                verify=False, measure=False).program
    return program


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
