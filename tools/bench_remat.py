"""Benchmark ``remat`` (recompute and offload): step time and peak memory against per-block checkpointing,
PyTorch's own offload (``save_on_cpu``) and torch.compile's memory-budget partitioner, every row in one run.

GPU (``--device cuda``): Hugging Face GPT-2, 24 layers, d1024, 16 heads, vocab 50304, batch 8, seq 1024,
dropout 0, bf16 autocast, fused AdamW. Rows (most informative first; ``--rows`` picks some by name):
eager; HF per-block checkpointing; ``save_on_cpu(pin_memory=True)`` around the whole forward and around each
block; ``remat`` policies and budgets without and with ``offload`` (eager); torch.compile, compile +
``activation_memory_budget`` 0.5, ``remat blocks`` + compile, the cheapest eager ``remat`` plan at ≤ 9.6 GiB
+ compile, ``remat`` budget 0.3 + compile, ``remat`` + offload + compile; the captured graph without remat; more budgets, ``sqrt`` and
``blocks`` with the loss head kept.

Per row (``--warmup`` steps, then ``--steps`` ≥ 10 timed steps, each synchronised): the median step time and
its spread (min, max, max/median); ``peak`` = ``torch.cuda.max_memory_allocated`` and ``reserved`` =
``max_memory_reserved`` over the timed steps (parameters, gradients and AdamW state included, memory left by
earlier rows subtracted); ``retries`` = ``num_alloc_retries`` (the allocator freed its cache and retried a
cudaMalloc) and ``mallocs`` = cudaMalloc calls during the timed steps (0 in a steady state); ``graphs`` =
torch.compile graphs compiled during the timed steps (recompilation); ``gc`` = Python generation-2
collections during them (the JSON has each of these per step, to pin a slow step on its cause); for offload rows, MiB sent to host per step and the on-demand fetches per step
(a fetch is a prefetch that did not happen; its copy is exposed). Between rows: ``gc.collect()``,
``torch._dynamo.reset()``, ``torch.cuda.empty_cache()``, ``reset_peak_memory_stats()``. ``--isolate`` runs each
row in a fresh process instead (no allocator or compiler state carried between rows); ``--expandable-segments``
sets ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (fragmentation is one suspect of the compiled rows'
spread). Writes
``$OUT/bench_remat.json`` and ``$OUT/bench_remat.png``.

``--quick``: a tiny GPT-2 on the CPU (a smoke test): bytes saved for backward measured beside the plan's
prediction, and the offload rows through a simulated link (bytes sent to "host", gradients bit-identical).

    python3 tools/bench_remat.py --device cuda                       # every row, one process
    python3 tools/bench_remat.py --device cuda --isolate --rows 'compile + memory budget 0.5,remat blocks + compile'
    python3 tools/bench_remat.py --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effcompile.analysis import measure_saved_bytes  # noqa: E402
from effcompile.api import supply_host_link  # noqa: E402
from effcompile.capture import capture  # noqa: E402
from effcompile.errors import EffcompileError  # noqa: E402
from effcompile.pass_manager import PassManager, resolve_passes  # noqa: E402
from effcompile.passes.remat import OffloadedSpan, SimulatedLink  # noqa: E402
from effcompile.program import Program  # noqa: E402
from effcompile.spec import ModelSpec, load_hf_spec  # noqa: E402

GIB = 2**30
FULL = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50304, n_positions=1024, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0)
QUICK = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=128, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0)
MEMORY_TARGET_GIB = 9.6
TIME_LIMIT_S = 540.0  # one device command may run 10 minutes
COMPILE_ESTIMATE_S = 60.0
EAGER_REFERENCE, COMPILED_REFERENCE = "eager per-block ckpt (HF)", "compile + memory budget 0.5"

# name: (mode, kind, remat options, activation_memory_budget). In priority order: the time limit skips the last.
ROWS: dict[str, tuple[str, str, dict, float | None]] = {
    "eager": ("eager", "hf", {}, None),
    EAGER_REFERENCE: ("eager", "hf-checkpoint", {}, None),
    "save_on_cpu (forward)": ("eager", "hf-save-on-cpu", {}, None),
    "save_on_cpu (blocks)": ("eager", "hf-save-on-cpu-blocks", {}, None),
    "remat blocks": ("eager", "remat", {"policy": "blocks"}, None),
    "remat blocks + offload": ("eager", "remat", {"policy": "blocks", "offload": "on"}, None),
    "remat budget 0.2": ("eager", "remat", {"budget": 0.2}, None),
    "remat budget 0.2 + offload": ("eager", "remat", {"budget": 0.2, "offload": "auto"}, None),
    "remat budget 0.15 + offload": ("eager", "remat", {"budget": 0.15, "offload": "auto"}, None),
    "remat budget 0.3": ("eager", "remat", {"budget": 0.3}, None),
    "remat budget 0.3 + offload": ("eager", "remat", {"budget": 0.3, "offload": "auto"}, None),
    "remat budget 0.5": ("eager", "remat", {"budget": 0.5}, None),
    COMPILED_REFERENCE: ("compile", "hf", {}, 0.5),
    "remat blocks + compile": ("compile", "remat", {"policy": "blocks"}, None),
    "remat matched + compile": ("compile", "remat", {}, None),  # options chosen from the eager rows
    "remat budget 0.3 + compile": ("compile", "remat", {"budget": 0.3}, None),
    "compile": ("compile", "hf", {}, None),
    "remat budget 0.2 + offload + compile": ("compile", "remat", {"budget": 0.2, "offload": "auto"}, None),
    "captured graph, no remat": ("eager", "plain", {}, None),
    "remat budget 0.1": ("eager", "remat", {"budget": 0.1}, None),
    "remat budget 0.1 + offload": ("eager", "remat", {"budget": 0.1, "offload": "auto"}, None),
    "remat sqrt": ("eager", "remat", {"policy": "sqrt"}, None),
    "remat blocks, head kept": ("eager", "remat", {"policy": "blocks", "head": "keep"}, None),
}


def log(message: str) -> None:
    """Print one line and flush (the lead reads rows as they come)."""
    print(message, flush=True)


def build_spec(config: dict, batch: int, seq: int, device: str) -> ModelSpec:
    """The HF GPT-2 ModelSpec on ``device`` (random weights, seed 0, labels = input_ids)."""
    spec = load_hf_spec("gpt2", config, batch=batch, seq=seq)
    spec.module.to(device)
    spec.kwargs = {k: v.to(device) for k, v in spec.kwargs.items()}
    return spec


def remat_module(base: Program, options: dict, device: str) -> tuple[torch.nn.Module, dict]:
    """Run ``remat`` with ``options`` on a copy of ``base`` (whose parameters wait on the CPU)."""
    program = base.clone()
    program.gm.to(device)
    if device == "cuda":
        options = {**options, "autocast": "bfloat16"}  # plan for what bf16 autocast training saves
    passes = resolve_passes(["remat"], {"remat": options})
    supply_host_link(program)  # the measured (or cached) link, as effcompile.compile hands it to remat
    result = PassManager(passes, verify=False, measure=False).run(program)
    record = result.records[0]
    if not record.changed:
        raise RuntimeError(f"remat changed nothing: {record.reason}")
    return result.program.gm, record.details


class SaveOnCpuBlock(torch.nn.Module):
    """A transformer block whose saved tensors go to pinned host memory (PyTorch's ``save_on_cpu``)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return self.block(*args, **kwargs)


def train_step_fn(model: torch.nn.Module, inputs: dict, device: str, fused: bool,
                  save_on_cpu: bool = False) -> Callable[[], float]:
    """One AdamW step under bf16 autocast (CUDA) or float32 (CPU); returns a closure (the loss, synchronised)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if save_on_cpu:
                with torch.autograd.graph.save_on_cpu(pin_memory=device == "cuda"):
                    loss = model(**inputs).loss
            else:
                loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def time_steps(step: Callable[[], float], device: str, warmup: int, steps: int) -> dict:
    """Run ``warmup`` then ``steps`` steps, each timed alone; step times (ms) and what the allocator, the
    compiler and the garbage collector did during the timed steps."""
    for _ in range(warmup):
        step()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_stats()
    graphs, collections = _dynamo_graphs(), gc.get_stats()[2]["collections"]
    times, events = [], []  # per step: (alloc retries, cudaMallocs, graphs compiled, gen-2 collections)
    previous = (before.get("num_alloc_retries", 0), before.get("num_device_alloc", 0)) if cuda else (0, 0)
    for _ in range(steps):
        started = time.perf_counter()
        step()  # returns the loss as a float: synchronised
        times.append((time.perf_counter() - started) * 1000)
        stats = torch.cuda.memory_stats() if cuda else {}
        now = (stats.get("num_alloc_retries", 0), stats.get("num_device_alloc", 0))
        events.append((now[0] - previous[0], now[1] - previous[1], _dynamo_graphs() - graphs,
                       gc.get_stats()[2]["collections"] - collections))
        previous = now
    result = {"step_ms": [round(t, 3) for t in times], "graphs_compiled": _dynamo_graphs() - graphs,
              "gc_collections": gc.get_stats()[2]["collections"] - collections,
              "step_retries": [e[0] for e in events], "step_mallocs": [e[1] for e in events],
              "step_graphs_so_far": [e[2] for e in events], "step_gc_so_far": [e[3] for e in events]}
    if cuda:
        after = torch.cuda.memory_stats()
        result.update(peak_bytes=torch.cuda.max_memory_allocated(), reserved_bytes=torch.cuda.max_memory_reserved(),
                      alloc_retries=after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0),
                      device_mallocs=after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0),
                      total_alloc_retries=after.get("num_alloc_retries", 0))
    return result


def spread(times: list[float]) -> dict:
    """Median, min, max and max/median of step times in ms."""
    median = statistics.median(times)
    return {"ms_median": round(median, 2), "ms_min": round(min(times), 2), "ms_max": round(max(times), 2),
            "max_over_median": round(max(times) / median, 3)}


def free(device: str) -> None:
    """Drop everything a configuration left behind before the next one measures its peak."""
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Sweep:
    """The GPU rows of one process (or the one row of an isolated child)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, args.device
        self.model_config = FULL if self.device == "cuda" else QUICK
        self.started = time.perf_counter()
        self.base: Program | None = None
        spec = build_spec(self.model_config, args.batch, args.seq, "cpu")
        self.inputs = {k: v.to(self.device) for k, v in spec.kwargs.items()}

    def hf_model(self, kind: str) -> torch.nn.Module:
        from transformers import AutoConfig, GPT2LMHeadModel

        config = AutoConfig.for_model("gpt2", **self.model_config, use_cache=False)
        torch.manual_seed(0)
        with torch.device(self.device):  # initialising 355M parameters on the GPU takes ms, on the CPU seconds
            model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").train()
        if kind == "hf-checkpoint":
            model.gradient_checkpointing_enable()
        elif kind == "hf-save-on-cpu-blocks":
            model.transformer.h = torch.nn.ModuleList(SaveOnCpuBlock(block) for block in model.transformer.h)
        return model

    def base_program(self) -> Program:
        if self.base is None:
            # Planned at the training batch, so the byte figures are those of the measured run.
            spec = build_spec(self.model_config, self.args.batch, self.args.seq, self.device)
            self.base = capture(spec, "export")
            log(f"# captured: {len(self.base.gm.graph.nodes)} nodes; {self.base.meta.get('causal_sdpa', 0)} SDPA "
                "calls given is_causal=True (as HF eager runs them)")
            self.base.gm.to("cpu")  # parameters wait on the CPU; each configuration copies them back
            del spec
            free(self.device)
        return self.base

    def build(self, name: str, kind: str, options: dict) -> tuple[torch.nn.Module, dict]:
        if kind.startswith("hf"):
            return self.hf_model(kind), {}
        if kind == "plain":
            return self.base_program().clone().gm.to(self.device), {}
        return remat_module(self.base_program(), options, self.device)

    def measure(self, name: str, rows: list[dict]) -> dict | None:
        """One row: build, warm up, time; errors become the row's ``error``."""
        mode, kind, options, memory_budget = ROWS[name]
        if name == "remat matched + compile":
            options = matched_options(rows)
            if options.get("policy") == "blocks" and any(r["config"] == "remat blocks + compile" for r in rows):
                return None  # the same row as remat blocks + compile
        compiled = mode == "compile"
        elapsed = time.perf_counter() - self.started
        if elapsed + (COMPILE_ESTIMATE_S if compiled else 15.0) > self.args.time_limit:
            log(f"{name:<38} skipped: {elapsed:.0f}s used of the {self.args.time_limit:.0f}s budget")
            return None
        row: dict[str, Any] = {"config": name, "mode": mode, "options": options}
        resident = torch.cuda.memory_allocated() if self.device == "cuda" else 0
        model = runner = step = None
        previous = torch._functorch.config.activation_memory_budget
        try:
            model, details = self.build(name, kind, options)
            gc.collect()  # what building the configuration dropped (GraphModules sit in reference cycles)
            if memory_budget is not None:
                torch._functorch.config.activation_memory_budget = memory_budget
            runner = torch.compile(model, backend=self.args.compile_backend) if compiled else model
            step = train_step_fn(runner, self.inputs, self.device, fused=self.device == "cuda",
                                 save_on_cpu=kind == "hf-save-on-cpu")
            measured = time_steps(step, self.device, self.args.warmup + (1 if compiled else 0), self.args.steps)
            row.update(spread(measured["step_ms"]), **measured)
            if self.device == "cuda":
                row.update(peak_gib=round((measured["peak_bytes"] - resident) / GIB, 3),
                           reserved_gib=round((measured["reserved_bytes"] - resident) / GIB, 3),
                           resident_before_gib=round(resident / GIB, 3))
            links = [link for m in model.modules() if isinstance(m, OffloadedSpan) for link in m.links()]
            if links:
                total = self.args.steps + self.args.warmup + (1 if compiled else 0)
                moved = sum(getattr(link, "bytes", {}).get("mark", 0) for link in links)
                fetched = sum(getattr(link, "counts", {}).get("fetch", 0) for link in links)
                row.update(offloaded_mib_per_step=round(moved / total / 2**20, 1),
                           fetches_per_step=round(fetched / total, 2))
            if details:
                row.update(segments=len(details.get("segments", [])), plan=details["summary"],
                           predicted_saved_fraction=round(details["predicted_saved_bytes_after"] /
                                                          max(details["predicted_saved_bytes_before"], 1), 3),
                           recompute_share=round(details["recompute_share"], 3),
                           predicted_step_ms=round(1000 * details.get("predicted_step_seconds", 0.0), 2),
                           predicted_exposed_ms=round(1000 * details.get("predicted_exposed_copy_seconds", 0.0), 3),
                           offloaded_bytes=details.get("offloaded_bytes", 0),
                           link_gb_per_s=round(details.get("link_bytes_per_second", 0.0) / 1e9, 1),
                           time_scale=round(details.get("time_scale", 0.0), 3))
        except Exception as error:  # one broken configuration must not stop the sweep
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            if not isinstance(error, EffcompileError):  # an unreachable budget is an answer, not a bug
                traceback.print_exc(limit=4)
        finally:
            torch._functorch.config.activation_memory_budget = previous
            model = runner = step = None  # noqa: F841
            free(self.device)
        return row


def matched_options(rows: list[dict]) -> dict:
    """The cheapest eager recompute-only remat plan measured at ≤ 9.6 GiB (else the smallest-memory one)."""
    eager = [r for r in rows if r["config"].startswith("remat") and r["mode"] == "eager" and "ms_median" in r
             and "offload" not in r["config"]]
    fitting = [r for r in eager if r.get("peak_gib", 0) <= MEMORY_TARGET_GIB]
    chosen = min(fitting, key=lambda r: r["ms_median"]) if fitting else \
        (min(eager, key=lambda r: r.get("peak_gib", 0)) if eager else {"options": {"policy": "blocks"}})
    return dict(chosen["options"])


def header() -> None:
    log(f"{'config':<38} {'median':>7} {'min':>6} {'max':>6} {'max/med':>7} {'peak':>6} {'resv':>6} {'retry':>5} "
        f"{'malloc':>6} {'graphs':>6} {'vs ref':>7} {'ovhd':>5} {'off MiB':>7} {'fetch':>5}  plan")
    log(f"# ms per step over the timed steps; GiB; vs ref: eager rows ÷ {EAGER_REFERENCE}, compiled rows ÷ "
        f"{COMPILED_REFERENCE}; ovhd: extra ms over eager ÷ per-block checkpointing's extra ms (goal ≤ 0.6)")


def format_row(row: dict, rows: list[dict]) -> str:
    """One table line, with the row's ratio to its reference and its overhead share."""
    if "error" in row:
        return f"{row['config']:<38} ERROR {row['error']}"
    by_name = {r["config"]: r for r in rows if "ms_median" in r}
    eager = by_name.get("eager")
    reference = by_name.get(COMPILED_REFERENCE if row["mode"] == "compile" else EAGER_REFERENCE)
    vs_ref, overhead = "-", "-"
    if reference and reference is not row:
        row["ratio_vs_reference"] = round(row["ms_median"] / reference["ms_median"], 3)
        vs_ref = f"{row['ratio_vs_reference']:.2f}x"
    if eager:
        row["ratio_vs_eager"] = round(row["ms_median"] / eager["ms_median"], 3)
    if row["mode"] == "eager" and eager and reference and reference["ms_median"] > eager["ms_median"]:
        share = (row["ms_median"] - eager["ms_median"]) / (reference["ms_median"] - eager["ms_median"])
        row["overhead_vs_per_block"] = round(share, 3)
        overhead = f"{share:.2f}"
    number = lambda key, fmt: format(row[key], fmt) if key in row else "-"  # noqa: E731
    return (f"{row['config']:<38} {row['ms_median']:>7.1f} {row['ms_min']:>6.1f} {row['ms_max']:>6.1f} "
            f"{row['max_over_median']:>7.3f} {number('peak_gib', '.2f'):>6} {number('reserved_gib', '.2f'):>6} "
            f"{number('alloc_retries', 'd'):>5} {number('device_mallocs', 'd'):>6} {row['graphs_compiled']:>6d} "
            f"{vs_ref:>7} {overhead:>5} {number('offloaded_mib_per_step', '.0f'):>7} "
            f"{number('fetches_per_step', '.1f'):>5}  {row.get('plan', '')}")


def selected_rows(args: argparse.Namespace) -> list[str]:
    """The rows to run, in priority order (``--rows``: names separated by commas)."""
    if not args.rows:
        return list(ROWS)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows are: {', '.join(ROWS)}")
    return [n for n in ROWS if n in names]


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Every selected row, in this process or (``--isolate``) one fresh process per row."""
    torch.backends.cuda.matmul.allow_tf32 = True
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU dry run (tiny GPT-2, float32)"
    config = FULL if args.device == "cuda" else QUICK
    log(f"# GPT-2 {config['n_layer']}L d{config['n_embd']} vocab {config['vocab_size']}, batch {args.batch}, seq "
        f"{args.seq}, bf16 autocast, fused AdamW, {args.warmup} warm-up + {args.steps} timed steps, {where}, torch "
        f"{torch.__version__}{', each row in a fresh process' if args.isolate else ''}"
        f"{', expandable segments' if args.expandable_segments else ''}")
    header()
    rows: list[dict] = []
    sweep = None if args.isolate else Sweep(args)
    started = time.perf_counter()
    for name in selected_rows(args):
        if args.isolate:
            row = run_isolated(name, args, rows, time.perf_counter() - started)
        else:
            row = sweep.measure(name, rows)
        if row is not None:
            rows.append(row)
            log(format_row(row, rows))
    return rows


def run_isolated(name: str, args: argparse.Namespace, rows: list[dict], elapsed: float) -> dict | None:
    """Run one row in a child process (same arguments); its row comes back as JSON."""
    if elapsed + (COMPILE_ESTIMATE_S if ROWS[name][0] == "compile" else 40.0) > args.time_limit:
        log(f"{name:<38} skipped: {elapsed:.0f}s used of the {args.time_limit:.0f}s budget")
        return None
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps), "--compile-backend",
                   args.compile_backend, "--child-row", name, "--child-out", str(result),
                   "--child-rows", json.dumps(rows)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(60.0, args.time_limit - elapsed))
        if not result.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"config": name, "mode": ROWS[name][0], "error": f"child exited {done.returncode}: {' | '.join(tail)}"}
        return json.loads(result.read_text())


def run_child(args: argparse.Namespace) -> None:
    """The isolated child: one row, written as JSON."""
    torch.backends.cuda.matmul.allow_tf32 = True
    row = Sweep(args).measure(args.child_row, json.loads(args.child_rows))
    Path(args.child_out).write_text(json.dumps(row))


def run_quick(args: argparse.Namespace) -> list[dict]:
    """Tiny GPT-2 on the CPU: saved bytes measured vs predicted; offload rows through a simulated link."""
    device = "cpu"
    spec = build_spec(QUICK, 2, 64, device)
    base = capture(spec, "export")
    rows: list[dict] = []
    log(f"# quick: GPT-2 {QUICK['n_layer']}L d{QUICK['n_embd']}, batch 2, seq 64, CPU float32")
    log(f"{'config':<30} {'median':>7} {'saved MiB':>10} {'predicted':>10} {'meas/pred':>9} {'host MiB':>8}  plan")

    def add(name: str, make: Callable[[], tuple[torch.nn.Module, dict]]) -> None:
        row: dict[str, Any] = {"config": name, "mode": "eager"}
        try:
            model, details = make()
            link = SimulatedLink()
            spans = [m for m in model.modules() if isinstance(m, OffloadedSpan)]
            for span in spans:
                span.use_link(link)
            program = Program(model, base.args, base.kwargs, None, base.capture_path) if details else \
                Program(model, (), spec.kwargs, None, "symbolic_trace")
            saved = measure_saved_bytes(model, program)  # the offload span's own hooks hide its saves from this
            if spans:  # what one forward sent to host memory
                row["host_bytes"] = sum(n for kind, _, n in link.log if kind == "to_host")
            measured = time_steps(train_step_fn(model, spec.kwargs, device, fused=False), device, 1, 10)
            row.update(spread(measured["step_ms"]), measured_saved_bytes=saved)
            if details:
                predicted = details["predicted_saved_bytes_after"] + details.get("offloaded_bytes", 0)
                row.update(predicted_saved_bytes=predicted, plan=details["summary"],
                           measured_over_predicted=round(saved / predicted, 4) if not spans else None)
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            if not isinstance(error, EffcompileError):
                traceback.print_exc(limit=3)
        rows.append(row)
        if "error" in row:
            log(f"{name:<30} ERROR {row['error']}")
            return
        predicted = row.get("predicted_saved_bytes")
        ratio = row.get("measured_over_predicted")
        log(f"{name:<30} {row['ms_median']:>7.1f} {row['measured_saved_bytes'] / 2**20:>10.3f} "
            f"{predicted / 2**20 if predicted else float('nan'):>10.3f} {ratio if ratio else float('nan'):>9.3f} "
            f"{row.get('host_bytes', 0) / 2**20:>8.3f}  {row.get('plan', '')}")

    def hf(checkpointing: bool) -> Callable[[], tuple[torch.nn.Module, dict]]:
        def make() -> tuple[torch.nn.Module, dict]:
            model = load_hf_spec("gpt2", QUICK, batch=2, seq=8).module.train()
            if checkpointing:
                model.gradient_checkpointing_enable()
            return model, {}
        return make

    free_link = {"link_bandwidth": 1e18, "offload_min_bytes": 0}
    add("eager", hf(False))
    add("eager per-block ckpt (HF)", hf(True))
    for options, name in (({"budget": 0.7}, "remat budget 0.7"), ({"budget": 0.5}, "remat budget 0.5"),
                          ({"budget": 0.3}, "remat budget 0.3"), ({"budget": 0.1}, "remat budget 0.1"),
                          ({"policy": "blocks"}, "remat blocks"), ({"policy": "sqrt"}, "remat sqrt"),
                          ({"budget": 0.5, "offload": "auto", **free_link}, "remat budget 0.5 + offload"),
                          ({"policy": "blocks", "offload": "on", **free_link}, "remat blocks + offload")):
        add(name, lambda options=options: remat_module(base, options, device))
    return rows


def write_outputs(rows: list[dict], quick: bool) -> None:
    """JSON of the rows and a memory-vs-step-time plot under ``$OUT`` (when set)."""
    out = os.environ.get("OUT")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench_remat.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        memory_key = "measured_saved_bytes" if quick else "peak_gib"
        points = [r for r in rows if r.get(memory_key) and "ms_median" in r]
        figure, axis = plt.subplots(figsize=(7.5, 5))
        for mode, marker in (("eager", "o"), ("compile", "s")):
            chosen = [r for r in points if r["mode"] == mode]
            memory = [r[memory_key] / (2**20 if quick else 1) for r in chosen]
            axis.scatter([r["ms_median"] for r in chosen], memory, marker=marker, label=mode)
            for r, m in zip(chosen, memory):
                axis.annotate(r["config"], (r["ms_median"], m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not quick:
            axis.axhline(MEMORY_TARGET_GIB, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xlabel("ms / step (median)")
        axis.set_ylabel("saved for backward (MiB)" if quick else "peak memory (GiB)")
        axis.set_title("remat: memory vs step time" + (" (quick, CPU)" if quick else
                                                        " — GPT-2 24L d1024, batch 8 × 1024, bf16"))
        axis.legend()
        figure.tight_layout()
        figure.savefig(Path(out) / "bench_remat.png", dpi=120)
    except Exception as error:  # the plot is a convenience; the JSON is the record
        log(f"# plot not written: {error}")


def main() -> None:
    """Parse arguments, run the sweep (or one isolated row), write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 on CPU, saved bytes instead of CUDA memory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all, in priority order)")
    parser.add_argument("--isolate", action="store_true", help="each row in a fresh process")
    parser.add_argument("--expandable-segments", action="store_true",
                        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (fewer fragmentation retries)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help="seconds; configurations that would start after it are skipped")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager checks the compiled path cheaply on CPU)")
    parser.add_argument("--child-row", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-rows", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.expandable_segments:  # before CUDA starts; isolated children inherit the environment
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if args.steps < 10 and not args.quick and args.device == "cuda":
        raise SystemExit("--steps must be at least 10 (medians and spreads of fewer steps are not figures)")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.device == "cuda" and not args.quick and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU; use --quick (or --device cpu for a dry run) on CPU")
    if args.child_row:
        run_child(args)
        return
    rows = run_quick(args) if args.quick else run_sweep(args)
    write_outputs(rows, args.quick)


if __name__ == "__main__":
    main()
