"""Benchmark the ``pipeline`` pass on torch.distributed.pipelining (issue #10).

A 24-layer GPT-2-shaped model (d=2048, 16 heads, seq 2048, vocab 50304, bf16 parameters, AdamW), cut by the
pass into K stages, trained with GPipe and 1F1B at 8 and 16 micro-batches. Per configuration: tokens/s,
per-GPU peak memory, measured vs theoretical bubble, and the loss after N steps against one device
accumulating the same micro-batches (the reference, measured in the same run).

Three ways to run it:
- ``python3 tools/bench_pipeline.py --device cuda``: one GPU. The 1-device reference, then the staged
  model with all K stages in this one process (``ScheduleInterleaved1F1B`` on a world of one): checks the
  stages train like the original on the GPU and measures the cost of staging.
- ``torchrun --nproc-per-node K tools/bench_pipeline.py --device cuda``: K GPUs over NCCL (the command
  is printed with the environment it needs). Rank 0 measures the 1-GPU reference first.
- ``--quick``: tiny shapes on CPU with gloo; without torchrun it also launches the 2-process run itself.

Measured bubble = 1 - t_ref / (K * t_pipe): the share of the K devices' time not spent on the reference's
work (includes imbalance and communication). Theoretical = (K-1)/(M+K-1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
NCCL_ENV = "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1"
FULL = dict(n_layer=24, n_embd=2048, n_head=16, vocab_size=50304, n_positions=2048,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
QUICK = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU)")
    parser.add_argument("--stages", default=None, help="single process: comma-separated K values (default 2,4)")
    parser.add_argument("--microbatches", default="8,16")
    parser.add_argument("--schedules", default="gpipe,1f1b")
    parser.add_argument("--mbs", type=int, default=None, help="sequences per micro-batch (default 1; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 50; quick 6)")
    parser.add_argument("--staged-steps", type=int, default=None, help="single-process staged runs (default 10)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--budget-s", type=float, default=225.0, help="skip configurations after this many seconds")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--hand-split", action="store_true", help="also run K=2 cut by hand at layer 12")
    parser.add_argument("--no-launch", action="store_true", help="--quick: do not launch the torchrun run")
    options = parser.parse_args()
    options.mbs = options.mbs or (2 if options.quick else 1)
    options.steps = options.steps or (6 if options.quick else 50)
    options.staged_steps = options.staged_steps or (4 if options.quick else 10)
    return options


class Bench:
    def __init__(self, options: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.options, self.rank, self.world, self.device = options, rank, world, device
        self.config = QUICK if options.quick else FULL
        self.seq = 32 if options.quick else 2048
        self.dtype = torch.float32 if options.quick else torch.bfloat16
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.reference: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ helpers
    def emit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.rank == 0:
            print(json.dumps(row), flush=True)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.options.budget_s

    def batch(self, step: int, microbatches: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, self.config["vocab_size"], (microbatches * self.options.mbs, self.seq), generator=generator)
        ids = ids.to(self.device)
        return {"input_ids": ids, "labels": ids}

    def spec(self):
        from effcompile.spec import load_hf_spec

        spec = load_hf_spec("gpt2", self.config, batch=max(2, self.options.mbs), seq=self.seq)
        spec.module.to(device=self.device, dtype=self.dtype)
        spec.kwargs = {k: v.to(self.device) for k, v in spec.kwargs.items()}
        return spec

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0

    def tokens(self, microbatches: int) -> int:
        return microbatches * self.options.mbs * self.seq

    # ------------------------------------------------------------------ 1-device reference
    def run_reference(self, microbatches: int) -> None:
        spec = self.spec()
        model = spec.module
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.options.lr, weight_decay=0.0)
        losses, seconds = [], []
        self.reset_memory()
        for step in range(self.options.steps):
            batch = self.batch(step, microbatches)
            self.sync()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for chunk in range(microbatches):
                part = slice(chunk * self.options.mbs, (chunk + 1) * self.options.mbs)
                loss = model(input_ids=batch["input_ids"][part], labels=batch["labels"][part]).loss
                (loss / microbatches).backward()
                total += loss.detach().float()
            optimizer.step()
            losses.append(float(total) / microbatches)
            self.sync()
            seconds.append(time.perf_counter() - started)
        step_s = _median(seconds[2:] or seconds)
        self.reference[microbatches] = {"seconds": step_s, "losses": losses}
        self.emit({"config": f"1 device, {microbatches} micro-batches (reference)", "stages": 1,
                   "microbatches": microbatches, "tokens_per_s": round(self.tokens(microbatches) / step_s),
                   "ms_per_step": round(1000 * step_s, 1), "peak_gib": [round(self.peak_gib(), 2)],
                   "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "steps": len(losses)})
        del model, optimizer, spec
        self.reset_memory()

    # ------------------------------------------------------------------ staged runs
    def compile(self, stages: int, schedule: str, per_rank: int, split_before: tuple[str, ...] = ()):
        import effcompile

        spec = self.spec()
        options = {"stages": stages, "schedule": schedule, "microbatches": 8}
        if schedule == "interleaved":
            options["stages_per_rank"] = per_rank
        if split_before:
            options["split_before"] = split_before
        result = effcompile.compile(spec, passes=["pipeline"], options={"pipeline": options}, verify=False)
        del spec
        # Fresh weights for every configuration: keep the compiled ones on the CPU.
        result.initial = {id(p): p.detach().to("cpu", copy=True) for p in result.program.gm.parameters()}
        return result

    def microbatch_list(self) -> list[int]:
        return [int(m) for m in self.options.microbatches.split(",")]

    def run_staged(self, result, stages: int, schedule: str, microbatches: int, steps: int, label: str) -> None:
        from effcompile.train.pipeline import broadcast_loss, build_stages, step

        program = result.program
        details = result.report.record("pipeline").details
        setup = build_stages(program, self.rank, self.world, self.device, schedule, microbatches)
        local = {id(p) for p in setup.parameters()}
        for parameter in program.gm.parameters():  # restore fresh weights; drop other ranks' stages
            if id(parameter) in local:
                parameter.data.copy_(result.initial[id(parameter)])
            else:
                parameter.data = torch.empty(0, dtype=parameter.dtype, device=self.device)
        optimizer = torch.optim.AdamW(setup.parameters(), lr=self.options.lr, weight_decay=0.0)
        last_rank = (stages - 1) % self.world
        losses, seconds = [], []
        self.reset_memory()
        for index in range(steps):
            batch = self.batch(index, microbatches)
            self.sync()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = step(setup, program, (), batch)
            optimizer.step()
            self.sync()
            seconds.append(time.perf_counter() - started)
            losses.append(broadcast_loss(loss, last_rank, self.device) if self.world > 1 else loss)
        step_s = _median(seconds[2:] or seconds)
        peaks = [self.peak_gib()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, round(peaks[0], 2))
            peaks = gathered
        devices = self.world
        row = {"config": label, "stages": stages, "schedule": schedule, "microbatches": microbatches,
               "devices": devices, "tokens_per_s": round(self.tokens(microbatches) / step_s),
               "ms_per_step": round(1000 * step_s, 1), "peak_gib": [round(p, 2) for p in peaks],
               "imbalance": round(details["imbalance"], 3),
               "cut_mib": [round(c["bytes"] / 2**20, 3) for c in details["cuts"]],
               "bubble_theory": round((stages - 1) / (microbatches + stages - 1), 3) if devices > 1 else None,
               "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "steps": len(losses)}
        reference = self.reference.get(microbatches)
        if reference:
            row["speedup_vs_1_device"] = round(reference["seconds"] / step_s, 3)
            row["bubble_measured"] = round(1 - reference["seconds"] / (devices * step_s), 3) if devices > 1 else None
            same = min(len(losses), len(reference["losses"]))
            row["loss_reference_at_step"] = round(reference["losses"][same - 1], 4)
            row["loss_abs_diff"] = round(abs(losses[same - 1] - reference["losses"][same - 1]), 5)
        self.emit(row)
        del setup, optimizer
        self.reset_memory()

    # ------------------------------------------------------------------ drivers
    def single_process(self) -> None:
        microbatch_list = self.microbatch_list()
        if not self.options.no_baseline:
            for microbatches in microbatch_list:
                self.guard(f"reference M={microbatches}", lambda m=microbatches: self.run_reference(m))
        for stages in [int(k) for k in (self.options.stages or "2,4").split(",")]:
            def staged(stages: int = stages) -> None:
                result = self.compile(stages, "interleaved", stages)
                for microbatches in microbatch_list:
                    self.guard(f"staged K={stages} M={microbatches}", lambda m=microbatches: self.run_staged(
                        result, stages, "interleaved", m, self.options.staged_steps,
                        f"{stages} stages in 1 process, {m} micro-batches"))
            self.guard(f"compile K={stages}", staged)

    def distributed(self) -> None:
        microbatch_list = self.microbatch_list()
        if self.rank == 0 and not self.options.no_baseline:
            for microbatches in microbatch_list:
                self.guard(f"reference M={microbatches}", lambda m=microbatches: self.run_reference(m))
        dist.barrier()
        plans = [("", ())]
        if self.options.hand_split and self.world == 2 and not self.options.quick:
            plans.append((" hand split at layer 12", ("transformer.h.12",)))
        for suffix, split_before in plans:
            result = self.compile(self.world, "1f1b", 1, split_before)
            for schedule in self.options.schedules.split(","):
                for microbatches in microbatch_list:
                    if suffix and (schedule != "1f1b" or microbatches != microbatch_list[0]):
                        continue
                    unit = "GPUs" if self.device.type == "cuda" else "processes"
                    label = f"{self.world} {unit} {schedule}, {microbatches} micro-batches{suffix}"
                    skip = torch.tensor([1.0 if self.over_budget() else 0.0], device=self.device)
                    dist.all_reduce(skip)  # every rank must agree to run or skip a configuration
                    if skip.item():
                        self.emit({"config": label, "skipped": "over the time budget"})
                        continue
                    self.run_staged(result, self.world, schedule, microbatches, self.options.steps, label)
                    dist.barrier()
            del result

    def guard(self, what: str, function) -> None:
        if self.over_budget():
            self.emit({"config": what, "skipped": "over the time budget"})
            return
        try:
            function()
        except Exception as error:  # one broken configuration must not stop the others
            self.emit({"config": what, "error": f"{type(error).__name__}: {error}"[:500]})
            traceback.print_exc(file=sys.stderr)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _table(rows: list[dict[str, Any]]) -> str:
    keys = ["config", "tokens_per_s", "ms_per_step", "speedup_vs_1_device", "peak_gib", "imbalance",
            "bubble_theory", "bubble_measured", "loss_last", "loss_reference_at_step", "loss_abs_diff"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['config']} | {row.get('error') or row.get('skipped')} |")
            continue
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def _write(rows: list[dict[str, Any]], name: str) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(rows, indent=2))


def _commands() -> str:
    lines = []
    for gpus in (2, 4):
        hand = " --hand-split" if gpus == 2 else ""
        lines.append(f"{NCCL_ENV} PYTHONPATH=<effcompile on the path> torchrun --standalone --nproc-per-node {gpus} "
                     f"tools/bench_pipeline.py --device cuda{hand}")
    return "\n".join(lines)


def main() -> int:
    options = _parse()
    for pair in NCCL_ENV.split():  # multicast off in every environment this script starts
        key, value = pair.split("=")
        os.environ.setdefault(key, value)
    torch.manual_seed(0)
    if options.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if launched:
        from effcompile.train.pipeline import init_distributed

        rank, world, device = init_distributed(options.device, timeout_minutes=15)
        bench = Bench(options, rank, world, device)
        try:
            bench.distributed()
        finally:
            if rank == 0:
                print(_table(bench.rows), flush=True)
                _write(bench.rows, f"bench_pipeline_{world}gpu.json" if options.device == "cuda"
                       else f"bench_pipeline_{world}proc.json")
            dist.destroy_process_group()
        return 0

    device = torch.device("cuda" if options.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda:0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    port = 29000 + os.getpid() % 1000
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    bench = Bench(options, 0, 1, device)
    try:
        bench.single_process()
    finally:
        dist.destroy_process_group()
    print(_table(bench.rows), flush=True)
    _write(bench.rows, "bench_pipeline.json")
    if options.quick and options.device == "cpu" and not options.no_launch:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(ROOT / "tools" / "bench_pipeline.py"), "--quick", "--microbatches", options.microbatches,
                   "--schedules", options.schedules, "--steps", str(options.steps)]
        print("launching: " + " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=False)
    print("multi-GPU runs (NCCL, NVLink multicast off):\n" + _commands(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
