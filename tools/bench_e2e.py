"""End to end: time to a target validation loss of a Llama-style ~125M model at seq 8192 on real text, the peers'
best recipes against effcompile ``--passes auto`` (issue #21). Every row in one run, one process.

Workload: ``LlamaForCausalLM`` from a config (12 layers, d768, 12 heads, SwiGLU ff2048, byte vocabulary 256,
untied head, SDPA), seq 8192, batch 8 (64k tokens per step), the bundled byte corpus
(``effcompile.train.data.load_corpus("stdlib")``, validation = held-out files), AdamW (fused) lr 1e-3 with a
10-step warm-up then constant, gradient clipping 1.0, the same initial weights and data order in every row.

Rows (all trained by effcompile's trainer: prefetched batches, no per-step host sync, validation on fixed
windows every ``--eval-every`` steps, excluded from the clock):
  a  HF eager, autocast bf16, SDPA (flash)      the baseline: trains ``--t-base`` s; its best val loss = target
  b  HF + torch.compile
  c  HF + Liger-Kernel (apply_liger_kernel_to_llama)
  d  HF + Liger + torch.compile                 (a failure is recorded, as the anchors saw)
  e  effcompile --passes auto                   exact passes + bf16 amp (no option set by hand)
  f  effcompile --passes auto, auto.allow=sas
  g  (f)'s choice trained with AGA + LCLR       LCLR's horizon: --t-max at (f)'s step time
Rows b–g train until the target or ``--t-max`` s. Reported per row: time to target on the training clock
(interpolated between validations; the first validation at/below it too), the same without warm-up/compile
(the first steps' excess over the steady step time) and with the preparation (model build, capture, the auto
search) added, tokens/s, peak memory, final validation loss. Ratios against the best peer row (b–d) on both.

    source tools/device_env.sh
    python3 tools/bench_e2e.py                       # H200, every row, ≲ 9.5 minutes (prints the projection)
    python3 tools/bench_e2e.py --diagnose            # which SDPA kernel compiled HF / effcompile run, ~3 min
    python3 tools/bench_e2e.py --quick               # CPU smoke: tiny Llama, seconds per row
Writes ``bench_e2e.json`` and ``bench_e2e.png`` to ``--out`` (or ``$OUT``) after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules (e2e_report, e2e_diagnose)
from e2e_report import ROWS, comparisons, environment, plot, print_table

# The best peer (Liger) runs early so that a tight deadline cuts effcompile's rows, not the reference; Liger's
# patch of transformers' Llama classes is undone after its rows (and ``llama`` checks that it was).
RUN_ORDER = "acdbefg"


@dataclass
class Setup:
    """The workload and the run's time plan (seconds)."""

    layers: int = 12
    width: int = 768
    heads: int = 12
    ff: int = 2048
    seq: int = 8192
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 10
    eval_every: int = 8
    eval_batches: int = 2
    t_base: float = 30.0
    t_max: float = 45.0
    deadline: float = 570.0
    max_bytes: int | None = None
    device: str = "cuda"
    quick: bool = False
    auto_quick: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="abcdefg", help="rows to run (letters a-g; a is needed for the target)")
    parser.add_argument("--t-base", type=float, default=None, help="baseline training seconds (default 30)")
    parser.add_argument("--t-max", type=float, default=None, help="other rows' training-seconds limit (default 45)")
    parser.add_argument("--eval-every", type=int, default=None, help="validate every k steps (default 8)")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches (default 2)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="whole-run wall seconds (default 570): rows that would start later are skipped, a "
                             "row's --t-max is cut to the time left")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 8192)")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny Llama, seconds per row")
    parser.add_argument("--diagnose", action="store_true",
                        help="which SDPA backend compiled HF and compiled effcompile run, and their step times")
    parser.add_argument("--diagnose-seq", type=int, default=4096)
    parser.add_argument("--diagnose-batch", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    return parser.parse_args(argv)


def make_setup(args: argparse.Namespace) -> Setup:
    """The setup for the mode, with the command line's overrides."""
    if args.quick:
        setup = Setup(layers=2, width=64, heads=4, ff=128, seq=128, batch=4, lr=3e-3, warmup=2, eval_every=4,
                      eval_batches=1, t_base=2.0, t_max=3.0, deadline=120.0, max_bytes=1_000_000, device="cpu",
                      quick=True, auto_quick={"budget_seconds": 2, "steps": 2, "warmup": 1})
    else:
        seq = args.seq or 8192
        setup = Setup(seq=seq, batch=max(1, args.tokens // seq))
    for name in ("t_base", "t_max", "eval_every", "eval_batches", "deadline"):
        if getattr(args, name) is not None:
            setattr(setup, name, getattr(args, name))
    return setup


# ----------------------------------------------------------------------------------------------- models

def llama(setup: Setup, device: torch.device, liger: bool = False) -> torch.nn.Module:
    """The workload's model with seed-0 weights (the same in every row), in training mode on ``device``
    (``liger``: built while Liger's patch is applied). Raises RuntimeError if Liger's patch leaked into a
    model that should be plain."""
    import transformers as T

    T.logging.set_verbosity_error()
    config = T.LlamaConfig(hidden_size=setup.width, intermediate_size=setup.ff, num_hidden_layers=setup.layers,
                           num_attention_heads=setup.heads, num_key_value_heads=setup.heads, vocab_size=256,
                           max_position_embeddings=setup.seq, use_cache=False, attn_implementation="sdpa",
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM(config).train()
    if not liger and any("Liger" in type(m).__name__ for m in model.modules()):
        raise RuntimeError("Liger-Kernel's patch of transformers' Llama outlived its rows; the rows would not compare")
    return model


class LigerPatch:
    """``apply_liger_kernel_to_llama`` for the rows that ask, undone afterwards (it patches transformers' Llama
    module and class, which would change every model built later)."""

    def __enter__(self) -> LigerPatch:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        from transformers.models.llama import modeling_llama

        self.module = modeling_llama
        self.saved = dict(vars(modeling_llama))
        self.forward = modeling_llama.LlamaForCausalLM.forward
        apply_liger_kernel_to_llama()
        return self

    def __exit__(self, *exc: object) -> None:
        for name in [n for n in vars(self.module) if n not in self.saved]:
            delattr(self.module, name)
        for name, value in self.saved.items():
            setattr(self.module, name, value)
        self.module.LlamaForCausalLM.forward = self.forward


def example_batch(corpus: Any, setup: Setup, device: torch.device) -> dict[str, torch.Tensor]:
    """Real text for capture and auto's timing: one batch of training windows (not one the rows train on)."""
    from effcompile.train.data import Batches

    ids = Batches(corpus.train, setup.batch, setup.seq, seed=12345).batch(0).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


# --------------------------------------------------------------------------------------------- measures

def time_to_target(validation: list[dict[str, Any]], target: float) -> tuple[float | None, float | None]:
    """(training seconds at the first validation at or below ``target``, the crossing interpolated linearly
    between that validation and the one before); (None, None) if never reached."""
    previous = None
    for entry in validation:
        if entry["val_loss"] <= target:
            if previous is None or previous["val_loss"] <= entry["val_loss"]:
                return entry["train_s"], entry["train_s"]
            share = (previous["val_loss"] - target) / (previous["val_loss"] - entry["val_loss"])
            return entry["train_s"], previous["train_s"] + share * (entry["train_s"] - previous["train_s"])
        previous = entry
    return None, None


def warmup_excess(history: list[dict[str, Any]]) -> tuple[float, float | None]:
    """(seconds the first read-back interval took beyond the steady step time — compilation, autotuning —, the
    steady seconds per step: the median over the later intervals). Steps of one interval share its mean."""
    if not history:
        return 0.0, None
    first = 0
    while first < len(history) and history[first]["step_s"] == history[0]["step_s"]:
        first += 1
    later = sorted(r["step_s"] for r in history[first:])
    if not later:
        return 0.0, history[0]["step_s"]
    steady = later[len(later) // 2]
    return max(0.0, sum(r["step_s"] - steady for r in history[:first])), steady


def projected_seconds(setup: Setup, rows: str) -> dict[str, float]:
    """Worst-case wall seconds per row (training to --t-max, compile and search estimates, validation) and the
    start-up; what the run is planned against."""
    compile_s, capture_s, search_s = (0.0, 3.0, 5.0) if setup.quick else (45.0, 15.0, 40.0)
    evals = (setup.t_max / max(setup.eval_every * 0.15, 1e-3)) * setup.eval_batches * 0.05
    plan = {"startup": 10.0 if setup.quick else 30.0}
    for row in rows:
        train = setup.t_base if row == "a" else setup.t_max
        extra = {"b": compile_s, "d": compile_s, "e": capture_s + search_s + compile_s + 10,
                 "f": capture_s + search_s + compile_s + 20, "g": 10.0}.get(row, 0.0)
        plan[row] = train + extra + evals
    return plan


def peak_gib(history: list[dict[str, Any]]) -> float | None:
    """The highest CUDA peak the steps recorded, GiB."""
    peaks = [r["peak_mem_bytes"] for r in history if "peak_mem_bytes" in r]
    return round(max(peaks) / 2**30, 2) if peaks else None


# -------------------------------------------------------------------------------------------------- rows

class Run:
    """One benchmark run: the setup, the corpus, the target and the rows' results (written after each row)."""

    def __init__(self, setup: Setup, rows: str, out: Path) -> None:
        from effcompile.train.data import load_corpus

        self.setup, self.rows, self.out = setup, rows, out
        self.device = torch.device(setup.device)
        self.started = time.perf_counter()
        self.corpus = load_corpus("stdlib", max_bytes=setup.max_bytes)
        self.target: float | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.sas_choice: Any = None  # (f)'s compiled program, kept on the host for (g)
        self.sas_step_s: float | None = None

    def left(self) -> float:
        """Wall seconds left before the deadline."""
        return self.setup.deadline - (time.perf_counter() - self.started)

    def config(self, row: str, **overrides: Any) -> Any:
        from effcompile.train import TrainConfig

        setup = self.setup
        limit = setup.t_base if row == "a" else min(setup.t_max, max(1.0, self.left() - 15.0))
        values = dict(steps=1_000_000, batch=setup.batch, seq=setup.seq, lr=setup.lr, warmup=setup.warmup,
                      eval_every=setup.eval_every, eval_batches=setup.eval_batches, grad_clip=1.0,
                      target_loss=None if row == "a" else self.target, max_train_seconds=limit, log_every=10, seed=0)
        values.update(overrides)
        return TrainConfig(**values)

    def train(self, row: str, model: Any, prep_s: float, config: Any, example_inputs: Any = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train one row and summarise it."""
        from effcompile.train import Trainer

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        trainer = Trainer(model, self.corpus, config, example_inputs=example_inputs)
        result = trainer.run()
        history, validation = result.history, result.validation
        warm_s, steady = warmup_excess(history)
        first, crossing = time_to_target(validation, self.target) if self.target is not None else (None, None)
        tokens_per_step = config.batch * config.seq
        summary = {"row": row, "name": ROWS[row], "status": "ok", "prep_s": round(prep_s, 2),
                   "warmup_s": round(warm_s, 2), "steps": result.steps, "tokens": result.tokens,
                   "train_s": round(result.train_seconds, 2), "steady_step_s": steady,
                   "tokens_per_s": round(tokens_per_step / steady) if steady else None, "peak_gib": peak_gib(history),
                   "final_val_loss": result.final_val_loss,
                   "best_val_loss": min((v["val_loss"] for v in validation), default=None),
                   "reached": crossing is not None, "first_val_at_target_s": first, "time_to_target_s": crossing,
                   "mean_accum": round(sum(r.get("accum", 1) for r in history) / max(len(history), 1), 2),
                   "validation": validation, **(extra or {})}
        if crossing is not None:
            summary["time_to_target_excl_overhead_s"] = round(max(crossing - warm_s, 0.0), 2)
            summary["time_to_target_incl_overhead_s"] = round(crossing + prep_s, 2)
        del trainer, result
        return summary

    # -- the rows
    def hf_row(self, row: str) -> dict[str, Any]:
        compiled = row in "bd"
        liger = row in "cd"
        if liger:
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                return skipped(row, "liger-kernel is not installed (pip install liger-kernel==0.8.5)")
        if self.device.type != "cuda" and (liger or compiled):
            return skipped(row, "needs CUDA (Liger's kernels are Triton; torch.compile is not timed on the CPU)")
        started = time.perf_counter()
        context = LigerPatch() if liger else _Nothing()
        with context:
            model = llama(self.setup, self.device, liger)
            prep = time.perf_counter() - started
            inputs = example_batch(self.corpus, self.setup, self.device)
            autocast = "bfloat16" if self.device.type == "cuda" else "off"
            config = self.config(row, compile="on" if compiled else "off", autocast=autocast)
            summary = self.train(row, model, prep, config, example_inputs=inputs)
        if row == "a":
            self.target = summary["best_val_loss"]
            summary["target"] = self.target
            first, crossing = time_to_target(summary["validation"], self.target)
            summary.update(reached=True, first_val_at_target_s=first, time_to_target_s=crossing,
                           time_to_target_excl_overhead_s=round(max(crossing - summary["warmup_s"], 0.0), 2),
                           time_to_target_incl_overhead_s=round(crossing + summary["prep_s"], 2))
        return summary

    def auto_row(self, row: str) -> dict[str, Any]:
        import effcompile
        from effcompile.spec import ModelSpec

        allow = "sas" if row == "f" else ""
        options = {"auto": {**({"allow": allow} if allow else {}), **self.setup.auto_quick}}
        started = time.perf_counter()
        spec = ModelSpec(llama(self.setup, self.device), (), example_batch(self.corpus, self.setup, self.device),
                         None, "llama-e2e")
        result = effcompile.compile(spec, passes=["auto"], options=options, capture_path="export",
                                    dynamic_batch=False, verify=False, measure=False)
        del spec
        prep = time.perf_counter() - started
        auto = result.report.record("auto").details
        extra = {"auto": {"choice": auto["winner"]["label"], "why": auto["why"], "execution": auto["execution"],
                          "search_s": auto["search_seconds"], "compile_in_search_s": auto["compile_seconds"],
                          "candidates": [{k: c.get(k) for k in ("label", "status", "reason", "predicted_step_seconds",
                                                                 "measured_step_seconds", "predicted_memory_bytes",
                                                                 "measured_memory_bytes")} for c in auto["candidates"]],
                          "notes": auto["notes"]}}
        print(f"  {row}: auto chose {auto['winner']['label']} in {prep:.1f} s ({auto['why']})", flush=True)
        if row == "f" and "g" in self.rows:
            copy = result.program.clone()
            copy.gm.to("cpu")
            self.sas_choice = (copy, result.report, prep)
        _free(self.device)
        summary = self.train(row, result, prep, self.config(row), extra=extra)
        if row == "f":
            self.sas_step_s = summary["steady_step_s"]
        return summary

    def aga_lclr_row(self, row: str) -> dict[str, Any]:
        from effcompile.api import CompileResult

        if self.sas_choice is None:
            return skipped(row, "needs row f (its choice is trained here)")
        program, report, prep = self.sas_choice
        self.sas_choice = None
        program.gm.to(self.device)
        step_s = self.sas_step_s or 1.0
        horizon = max(self.setup.warmup + 2, math.ceil(self.setup.t_max / step_s))
        config = self.config(row, aga=True, accum=1, max_accum=8, lclr=True, schedule_steps=horizon)
        summary = self.train(row, CompileResult(program.gm, program, report), prep, config,
                             extra={"lclr_horizon_steps": horizon, "prep_note": "(f)'s capture and search"})
        return summary


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def skipped(row: str, why: str) -> dict[str, Any]:
    return {"row": row, "name": ROWS[row], "status": "skipped", "error": why}


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def save(run: Run, extra: dict[str, Any]) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    data = {"setup": asdict(run.setup), "target": run.target, "results": run.results,
            "comparisons": comparisons(run.results, run.setup.t_max), "environment": environment(), **extra}
    (run.out / "bench_e2e.json").write_text(json.dumps(data, indent=1, default=str))
    setup = run.setup
    plot(run.results, run.target, run.out / "bench_e2e.png",
         f"time to target: Llama {setup.layers} layers d{setup.width}, byte-level, {setup.batch} × {setup.seq} tokens")


# ------------------------------------------------------------------------------------------------- main

def run_rows(run: Run) -> None:
    plan = projected_seconds(run.setup, run.rows)
    total = sum(plan.values())
    print(f"projected worst case {total:.0f} s (deadline {run.setup.deadline:.0f} s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in plan.items()), flush=True)
    if total > run.setup.deadline:
        print("  note: the worst case passes the deadline; rows that reach the target stop early, later rows are "
              "skipped or cut at the deadline (lower --t-max / --t-base to fit)", flush=True)
    for row in (r for r in RUN_ORDER if r in run.rows):
        if row != "a" and run.target is None:
            run.results[row] = skipped(row, "no target: row a did not run or failed")
        elif run.left() < min(plan[row], 30.0):
            run.results[row] = skipped(row, f"deadline: {run.left():.0f} s left")
        else:
            print(f"row {row}: {ROWS[row]} ({run.left():.0f} s left)", flush=True)
            run.results[row] = _guarded(run, row)
            _free(run.device)
        r = run.results[row]
        print(f"  {row}: {r['status']} " + (f"to target {r.get('time_to_target_s')} s, {r.get('tokens_per_s')} tok/s, "
                                            f"peak {r.get('peak_gib')} GiB, final val {r.get('final_val_loss')}"
                                            if r["status"] == "ok" else r.get("error", "")), flush=True)
        save(run, {})


def _guarded(run: Run, row: str) -> dict[str, Any]:
    try:
        if row in "abcd":
            return run.hf_row(row)
        return run.aga_lclr_row(row) if row == "g" else run.auto_row(row)
    except Exception as error:  # a failing row (Liger + compile, out of memory) must not stop the run
        traceback.print_exc(file=sys.stderr)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return {"row": row, "name": ROWS[row], "status": "failed", "error": f"{type(error).__name__}: {first[:300]}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = make_setup(args)
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --quick for the CPU smoke", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.diagnose:
        from e2e_diagnose import diagnose

        return diagnose(setup, args.diagnose_seq, args.diagnose_batch, out)
    rows = "".join(r for r in args.rows if r in ROWS)
    if setup.quick:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a shared CPU they only contend
    run = Run(setup, rows, out)
    print(f"{environment()}  seq {setup.seq} × batch {setup.batch}, corpus {run.corpus.summary()}", flush=True)
    run_rows(run)
    print_table(run.results)
    comparison = comparisons(run.results, setup.t_max)
    for key, value in comparison.items():
        print(f"  {key}: {value}")
    save(run, {"wall_s": round(time.perf_counter() - run.started, 1)})
    print(f"wrote {out / 'bench_e2e.json'} and {out / 'bench_e2e.png'} in {time.perf_counter() - run.started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
