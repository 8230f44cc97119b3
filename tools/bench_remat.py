"""Benchmark ``remat``: peak memory and step time against per-block checkpointing and torch.compile's
memory-budget partitioner, in the same run.

GPU (``--device cuda``): Hugging Face GPT-2, 24 layers, d1024, 16 heads, vocab 50304, batch 8, seq 1024,
dropout 0, bf16 autocast, fused AdamW. Rows: no checkpointing; HF ``gradient_checkpointing_enable``
(per-block); ``remat`` budget 0.5 / 0.3 / 0.2 / 0.1, ``blocks``, ``sqrt`` and ``blocks`` with the loss head
kept (``head=keep``: what the chunked head is worth) (eager); the captured graph without remat;
``torch.compile``, ``torch.compile`` + ``activation_memory_budget`` 0.5, and ``remat`` (the cheapest eager plan
at ≤ 9.6 GiB) then ``torch.compile``. Peak = ``torch.cuda.max_memory_allocated`` over the timed steps (parameters,
gradients and AdamW state included). The graph is captured (torch.export) and planned at batch 8. Writes ``$OUT/bench_remat.json`` and ``$OUT/bench_remat.png``.

``--quick``: a tiny GPT-2 on CPU; bytes saved for backward measured with ``saved_tensors_hooks`` beside
the pass's prediction, instead of CUDA memory.

    python3 tools/bench_remat.py --device cuda
    python3 tools/bench_remat.py --quick
    python3 tools/bench_remat.py --device cpu --batch 2 --seq 64 --steps 1 --compile-backend aot_eager  # dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
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
from effcompile.capture import capture  # noqa: E402
from effcompile.errors import EffcompileError  # noqa: E402
from effcompile.pass_manager import PassManager, resolve_passes  # noqa: E402
from effcompile.program import Program  # noqa: E402
from effcompile.spec import ModelSpec, load_hf_spec  # noqa: E402

GIB = 2**30
FULL = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50304, n_positions=1024, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0)
QUICK = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=128, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0)
MEMORY_TARGET_GIB = 9.6
TIME_LIMIT_S = 225.0  # the whole GPU run must stay under 4 minutes
COMPILE_ESTIMATE_S = 60.0


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
    result = PassManager(passes, verify=False, measure=False).run(program)
    record = result.records[0]
    if not record.changed:
        raise RuntimeError(f"remat changed nothing: {record.reason}")
    return result.program.gm, record.details


def plain_graph(base: Program, device: str) -> torch.nn.Module:
    """The captured graph without any pass (separates what capture changes from what remat changes)."""
    program = base.clone()
    return program.gm.to(device)


def train_step_fn(model: torch.nn.Module, inputs: dict, device: str, fused: bool) -> Callable[[], float]:
    """One AdamW step under bf16 autocast (CUDA) or float32 (CPU); returns a closure."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def time_steps(step: Callable[[], float], device: str, warmup: int, steps: int) -> tuple[float, float]:
    """(ms per step, peak GiB over the timed steps; 0 on CPU)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - started) * 1000 / steps
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else 0.0
    return ms, peak


def free(device: str) -> None:
    """Drop everything a configuration left behind before the next one measures its peak."""
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """The GPU sweep; one row per configuration, each printed as soon as it is measured. With
    ``--device cpu`` the same code path runs on the tiny model (a dry run of the GPU sweep)."""
    started = time.perf_counter()
    device = args.device
    model_config = FULL if device == "cuda" else QUICK
    torch.backends.cuda.matmul.allow_tf32 = True
    rows: list[dict] = []
    inputs_spec = build_spec(model_config, args.batch, args.seq, "cpu")
    inputs = {k: v.to(device) for k, v in inputs_spec.kwargs.items()}
    del inputs_spec

    def fresh_model() -> torch.nn.Module:
        from transformers import AutoConfig, GPT2LMHeadModel

        config = AutoConfig.for_model("gpt2", **model_config, use_cache=False)
        torch.manual_seed(0)
        with torch.device(device):  # initialising 355M parameters on the GPU takes ms, on the CPU seconds
            model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        return model.train()

    base: Program | None = None

    def base_program() -> Program:
        nonlocal base
        if base is None:
            # Planned at the training batch, so the byte figures are those of the measured run.
            spec = build_spec(model_config, args.batch, args.seq, device)
            base = capture(spec, "export")
            made_causal = base.meta.get("causal_sdpa", 0)  # capture's exact canonicalisation
            log(f"# captured: {len(base.gm.graph.nodes)} nodes; {made_causal} SDPA calls given is_causal=True "
                "instead of their materialised causal mask (as HF eager runs them)")
            base.gm.to("cpu")  # parameters wait on the CPU; each configuration copies them back
            del spec
            free(device)
        return base

    def measure(name: str, mode: str, make: Callable[[], tuple[torch.nn.Module, dict]], compile_model: bool = False,
                memory_budget: float | None = None) -> dict | None:
        elapsed = time.perf_counter() - started
        if elapsed + (COMPILE_ESTIMATE_S if compile_model else 10.0) > args.time_limit:
            log(f"{name:<34} skipped: {elapsed:.0f}s used of the {args.time_limit:.0f}s budget")
            return None
        row: dict[str, Any] = {"config": name, "mode": mode}
        # Memory a previous configuration left allocated (caches, not this row's) is subtracted from the peak.
        resident = torch.cuda.memory_allocated() if device == "cuda" else 0
        try:
            model, details = make()
            gc.collect()  # what building the configuration dropped (GraphModules sit in reference cycles)
            previous = torch._functorch.config.activation_memory_budget
            if memory_budget is not None:
                torch._functorch.config.activation_memory_budget = memory_budget
            try:
                runner = torch.compile(model, backend=args.compile_backend) if compile_model else model
                step = train_step_fn(runner, inputs, device, fused=True)
                ms, peak = time_steps(step, device, args.warmup if not compile_model else args.warmup + 1, args.steps)
            finally:
                torch._functorch.config.activation_memory_budget = previous
            row.update(ms_per_step=round(ms, 2), peak_gib=round(peak - resident / GIB, 3),
                       resident_before_gib=round(resident / GIB, 3))
            if details:
                row.update(segments=len(details.get("segments", [])),
                           predicted_saved_fraction=round(details["predicted_saved_bytes_after"] /
                                                          max(details["predicted_saved_bytes_before"], 1), 3),
                           recompute_share=round(details["recompute_share"], 3), plan=details["summary"])
        except Exception as error:  # one broken configuration must not stop the sweep
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            if not isinstance(error, EffcompileError):  # an unreachable budget is an answer, not a bug
                traceback.print_exc(limit=3)
        finally:
            model = runner = step = None  # noqa: F841
            free(device)
        rows.append(row)
        log(format_row(row, rows))
        return row

    def hf(checkpointing: bool) -> Callable[[], tuple[torch.nn.Module, dict]]:
        def make() -> tuple[torch.nn.Module, dict]:
            model = fresh_model()
            if checkpointing:
                model.gradient_checkpointing_enable()
            return model, {}
        return make

    def remat(options: dict) -> Callable[[], tuple[torch.nn.Module, dict]]:
        return lambda: remat_module(base_program(), options, device)

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU dry run (tiny GPT-2, float32)"
    log(f"# GPT-2 {model_config['n_layer']}L d{model_config['n_embd']} vocab {model_config['vocab_size']}, "
        f"batch {args.batch}, seq {args.seq}, bf16 autocast, fused AdamW, {args.warmup} warm-up + {args.steps} "
        f"timed steps, {where}, torch {torch.__version__}")
    log(f"{'config':<34} {'ms/step':>8} {'peak GiB':>9} {'vs eager':>9} {'vs ref':>8} {'overhead':>9}  plan")
    log("# vs ref: eager rows ÷ HF per-block checkpointing, compiled rows ÷ compile + memory budget 0.5; "
        "overhead: extra ms over eager ÷ per-block checkpointing's extra ms (goal ≤ 0.5)")
    # Most informative first: later rows are skipped if the 4-minute budget runs short.
    measure("eager", "eager", hf(False))
    measure("eager per-block ckpt (HF)", "eager", hf(True))
    for options, name in (({"policy": "blocks"}, "remat blocks"), ({"budget": 0.3}, "remat budget 0.3"),
                          ({"budget": 0.5}, "remat budget 0.5")):
        measure(name, "eager", remat(options))
    measure("compile + memory budget 0.5", "compile", hf(False), compile_model=True, memory_budget=0.5)
    matched = matched_options(rows)
    measure(f"remat {matched['label']} + compile", "compile", remat(matched["options"]), compile_model=True)
    measure("compile", "compile", hf(False), compile_model=True)
    measure("captured graph, no remat", "eager", lambda: (plain_graph(base_program(), device), {}))
    for options, name in (({"budget": 0.2}, "remat budget 0.2"), ({"budget": 0.1}, "remat budget 0.1"),
                          ({"policy": "sqrt"}, "remat sqrt"),
                          ({"policy": "blocks", "head": "keep"}, "remat blocks, head kept")):
        measure(name, "eager", remat(options))
    return rows


def matched_options(rows: list[dict]) -> dict:
    """The cheapest eager remat plan measured at ≤ 9.6 GiB (else the smallest-memory one)."""
    eager = [r for r in rows if r["config"].startswith("remat") and "ms_per_step" in r]
    fitting = [r for r in eager if r["peak_gib"] <= MEMORY_TARGET_GIB]
    chosen = min(fitting, key=lambda r: r["ms_per_step"]) if fitting else \
        (min(eager, key=lambda r: r["peak_gib"]) if eager else {"config": "remat blocks"})
    label = chosen["config"].removeprefix("remat ")
    if label.startswith("budget"):
        return {"label": label, "options": {"budget": float(label.split()[-1])}}
    return {"label": label, "options": {"policy": label}}


def format_row(row: dict, rows: list[dict]) -> str:
    """One table line: the row, its ratio to eager and to its reference (per-block ckpt for eager remat
    rows, the memory-budget partitioner for compiled ones)."""
    if "error" in row:
        return f"{row['config']:<34} ERROR {row['error']}"
    by_name = {r["config"]: r for r in rows if "ms_per_step" in r}
    eager = by_name.get("eager")
    reference = by_name.get("compile + memory budget 0.5") if row["mode"] == "compile" else \
        by_name.get("eager per-block ckpt (HF)")
    vs_eager = f"{row['ms_per_step'] / eager['ms_per_step']:.2f}x" if eager else "-"
    vs_ref = f"{row['ms_per_step'] / reference['ms_per_step']:.2f}x" if reference and reference is not row else "-"
    row["ratio_vs_eager"] = vs_eager
    row["ratio_vs_reference"] = vs_ref
    overhead = "-"
    if row["mode"] == "eager" and eager and reference and reference["ms_per_step"] > eager["ms_per_step"]:
        # the goal: at most half of per-block checkpointing's extra time
        share = (row["ms_per_step"] - eager["ms_per_step"]) / (reference["ms_per_step"] - eager["ms_per_step"])
        row["overhead_vs_per_block"] = round(share, 3)
        overhead = f"{share:.2f}"
    peak = f"{row['peak_gib']:.2f}" if row.get("peak_gib") else "-"
    return (f"{row['config']:<34} {row['ms_per_step']:>8.1f} {peak:>9} {vs_eager:>9} {vs_ref:>8} {overhead:>9}  "
            f"{row.get('plan', '')}")


def run_quick(args: argparse.Namespace) -> list[dict]:
    """Tiny GPT-2 on CPU: bytes saved for backward, measured vs predicted, and ms/step."""
    device = "cpu"
    spec = build_spec(QUICK, 2, 64, device)
    base = capture(spec, "export")
    rows: list[dict] = []
    log(f"# quick: GPT-2 {QUICK['n_layer']}L d{QUICK['n_embd']}, batch 2, seq 64, CPU float32")
    log(f"{'config':<28} {'ms/step':>8} {'saved MiB':>10} {'predicted':>10} {'meas/pred':>9} {'fraction':>8}  plan")

    def add(name: str, make: Callable[[], tuple[torch.nn.Module, dict]]) -> None:
        row: dict[str, Any] = {"config": name, "mode": "eager"}
        try:
            model, details = make()
            program = Program(model, base.args, base.kwargs, None, base.capture_path) if details else None
            saved = measure_saved_bytes(model, program) if program else _saved_bytes_plain(model, spec.kwargs)
            ms, _ = time_steps(train_step_fn(model, spec.kwargs, device, fused=False), device, 1, 2)
            row.update(ms_per_step=round(ms, 2), measured_saved_bytes=saved)
            if details:
                predicted = details["predicted_saved_bytes_after"]
                row.update(predicted_saved_bytes=predicted, measured_over_predicted=round(saved / predicted, 4),
                           predicted_saved_fraction=round(predicted / details["predicted_saved_bytes_before"], 3),
                           recompute_share=round(details["recompute_share"], 3), plan=details["summary"])
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        rows.append(row)
        if "error" in row:
            log(f"{name:<28} ERROR {row['error']}")
            return
        predicted = row.get("predicted_saved_bytes")
        log(f"{name:<28} {row['ms_per_step']:>8.1f} {row['measured_saved_bytes'] / 2**20:>10.3f} "
            f"{predicted / 2**20 if predicted else float('nan'):>10.3f} {row.get('measured_over_predicted', float('nan')):>9.3f} "
            f"{row.get('predicted_saved_fraction', float('nan')):>8.3f}  {row.get('plan', '')}")

    def hf(checkpointing: bool) -> Callable[[], tuple[torch.nn.Module, dict]]:
        def make() -> tuple[torch.nn.Module, dict]:
            model = load_hf_spec("gpt2", QUICK, batch=2, seq=8).module.train()
            if checkpointing:
                model.gradient_checkpointing_enable()
            return model, {}
        return make

    add("eager", hf(False))
    add("eager per-block ckpt (HF)", hf(True))
    for options, name in (({"budget": 0.7}, "remat budget 0.7"), ({"budget": 0.5}, "remat budget 0.5"),
                          ({"budget": 0.3}, "remat budget 0.3"), ({"budget": 0.1}, "remat budget 0.1"),
                          ({"policy": "blocks"}, "remat blocks"), ({"policy": "sqrt"}, "remat sqrt")):
        add(name, lambda options=options: remat_module(base, options, device))
    return rows


def _saved_bytes_plain(model: torch.nn.Module, inputs: dict) -> int:
    program = Program(model, (), inputs, None, "symbolic_trace")  # only .run is used
    return measure_saved_bytes(model, program)


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
        points = [r for r in rows if r.get(memory_key) and "ms_per_step" in r]
        figure, axis = plt.subplots(figsize=(7.5, 5))
        for mode, marker in (("eager", "o"), ("compile", "s")):
            chosen = [r for r in points if r["mode"] == mode]
            memory = [r[memory_key] / (2**20 if quick else 1) for r in chosen]
            axis.scatter([r["ms_per_step"] for r in chosen], memory, marker=marker, label=mode)
            for r, m in zip(chosen, memory):
                axis.annotate(r["config"], (r["ms_per_step"], m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not quick:
            axis.axhline(MEMORY_TARGET_GIB, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xlabel("ms / step")
        axis.set_ylabel("saved for backward (MiB)" if quick else "peak memory (GiB)")
        axis.set_title("remat: memory vs step time" + (" (quick, CPU)" if quick else
                                                        " — GPT-2 24L d1024, batch 8 × 1024, bf16"))
        axis.legend()
        figure.tight_layout()
        figure.savefig(Path(out) / "bench_remat.png", dpi=120)
    except Exception as error:  # the plot is a convenience; the JSON is the record
        log(f"# plot not written: {error}")


def main() -> None:
    """Parse arguments, run the sweep, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 on CPU, saved bytes instead of CUDA memory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help="seconds; configurations that would start after it are skipped")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager checks the compiled path cheaply on CPU)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.quick:
        rows = run_quick(args)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda needs a GPU; use --quick (or --device cpu for a dry run) on CPU")
        rows = run_sweep(args)
    write_outputs(rows, args.quick)


if __name__ == "__main__":
    main()
