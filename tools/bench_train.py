"""Time to a target validation loss on real data (the Python standard library's sources, byte level):
baseline against + AGA, + LCLR, + sas, + amp, and all together.

Method (one run, same machine, same data, same initial weights):
1. ``baseline`` (AdamW, linear warm-up then constant LR, fixed accumulation of 2) trains for
   ``--budget`` seconds of training time. Unless ``--target`` is given, the target is the best validation
   loss the baseline reached; its time to target is when it first reached it.
2. Every other row trains from the same initial weights until it reaches the target or 1.5× the budget.
   AGA rows calibrate ε at their first measurement so that N starts at 1 (then N = ⌈σ²_g/σ²₀⌉, ≤ 8);
   LCLR rows use γ = 0.5, the baseline's peak LR and T = the baseline's tokens in steps of the row's
   starting N. Time is training time (validation excluded), measured with CUDA synchronisation per step,
   after an untimed warm-up.
3. ``sas`` / ``amp`` rows compile the model with that pass (``effcompile.compile``); a pass that is missing
   or fails is reported as "pass not available: <why>" and the next row runs.

    python3 tools/bench_train.py --quick             # CPU, tiny GPT, ~2 minutes
    python3 tools/bench_train.py --device cuda       # H200: 6-layer GPT d384 seq 256, ≤ 4 minutes
Writes ``bench_train.json`` and ``bench_train.png`` (validation loss against training time) to ``--out``
or ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROWS = ("baseline", "+aga", "+lclr", "+sas", "+sas-local", "+amp", "all")
ROW_SETTINGS = {  # (aga, lclr, passes)
    "baseline": (False, False, ()), "+aga": (True, False, ()), "+lclr": (False, True, ()),
    "+sas": (False, False, ("sas",)), "+sas-local": (False, False, ("sas",)), "+amp": (False, False, ("amp",)),
    "all": (True, True, ("sas", "amp")),
}
# Options a row forces over --set: "+sas-local" is "+sas" with the fixed local pattern at the same density,
# the quality reference for the importance pattern (issue #5).
ROW_OPTIONS = {"+sas-local": {"sas": {"pattern": "local", "warmup": 0}}}
# Quality rows train exactly the baseline's steps (same tokens: no AGA) instead of stopping at the target, so
# their final validation loss compares with the baseline's at equal data (issue #5's quality check).
QUALITY_ROWS = ("+sas", "+sas-local")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, short budget (CPU)")
    parser.add_argument("--budget", type=float, default=None, help="baseline training seconds")
    parser.add_argument("--target", type=float, default=None, help="target validation loss (default: baseline's best)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="whole-run seconds (default 210 on cuda, 300 --quick): later rows get less time")
    parser.add_argument("--set", dest="set_options", action="append", default=[], metavar="PASS.OPTION=VALUE",
                        help="options for the sas/amp rows, e.g. --set sas.density=0.5 (repeatable)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Model shape and training settings for the mode."""
    if args.quick:
        return dict(model=dict(layers=2, width=64, heads=2, seq=64), batch=8, accum=2, aga_start=1, max_accum=8,
                    lr=args.lr or 3e-3, warmup=5, eval_every=5, eval_batches=2, budget=args.budget or 12.0, max_bytes=2_000_000,
                    betas=(0.9, 0.99), time_limit=args.time_limit or 300.0)
    return dict(model=dict(layers=6, width=384, heads=6, seq=256), batch=32, accum=2, aga_start=1, max_accum=8,
                lr=args.lr or 1e-3, warmup=30, eval_every=20, eval_batches=4, budget=args.budget or 20.0, max_bytes=None,
                betas=(0.9, 0.99), time_limit=args.time_limit or 210.0)


def build(passes: tuple[str, ...], settings: dict[str, Any], device: torch.device,
          overrides: dict[str, dict[str, Any]] | None = None, corpus: Any = None) -> Any:
    """Compile the benchmark GPT (same seed → same initial weights) with ``passes`` on ``device``; ``overrides``
    replace single pass options (``{"sas": {"pattern": "local"}}``). With ``corpus``, the example inputs are
    8 sequences of its training text (what ``sas``'s importance pattern calibrates on), else random bytes."""
    import effcompile
    from effcompile.train import small_gpt_spec
    from effcompile.train.data import Batches

    spec = small_gpt_spec(**settings["model"], batch=2)
    spec.module.to(device)
    if corpus is not None:
        text = Batches(corpus.train, 8, settings["model"]["seq"], seed=12345).batch(0)
        spec.kwargs = {"input_ids": text, "labels": text.clone()}
    spec.kwargs = {k: v.to(device) for k, v in spec.kwargs.items()}
    options = {name: dict(values) for name, values in settings["pass_options"].items() if name in passes}
    for name, values in (overrides or {}).items():
        options.setdefault(name, {}).update(values)
    return effcompile.compile(spec, passes=list(passes), options=options, verify=False, measure=False)


def pass_problem(name: str) -> str | None:
    """Why a pass cannot be used (None if it is registered)."""
    try:
        from effcompile.pass_manager import registry

        return None if name in registry() else f"passes/{name}.py does not exist"
    except Exception as error:  # a broken pass module must not stop the benchmark
        return f"{type(error).__name__}: {error}"


def time_to(validation: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first validation record at or below ``target``."""
    return next((v for v in validation if v["val_loss"] <= target), None)


def run_row(name: str, settings: dict[str, Any], corpus: Any, device: torch.device, target: float | None,
            baseline_steps: int | None, seconds_left: float) -> dict[str, Any]:
    from effcompile.train import TrainConfig, train

    aga, lclr, passes = ROW_SETTINGS[name]
    for pass_name in passes:
        problem = pass_problem(pass_name)
        if problem:
            return {"row": name, "status": f"pass not available: {problem}"}
    started = time.perf_counter()
    result = build(passes, settings, device, ROW_OPTIONS.get(name), corpus)
    compile_s = time.perf_counter() - started
    budget = settings["budget"]
    quality = name in QUALITY_ROWS and baseline_steps is not None
    cap = budget if baseline_steps is None else (3.0 if quality else 1.5) * budget
    cap = min(cap, seconds_left - compile_s - 5.0)
    if cap < 2.0:
        return {"row": name, "status": "skipped: the benchmark's time limit is spent"}
    first = baseline_steps is None
    steps = baseline_steps if quality else 10**6  # rows end at the target or at their time cap
    config = TrainConfig(steps=steps, batch=settings["batch"], seq=settings["model"]["seq"], lr=settings["lr"],
                         optimizer="adamw", warmup=settings["warmup"], schedule="constant", lclr=lclr,
                         accum=settings["aga_start"] if aga else settings["accum"], aga=aga, max_accum=settings["max_accum"],
                         eval_every=settings["eval_every"], eval_batches=settings["eval_batches"],
                         betas=settings["betas"], target_loss=None if first or quality else target,
                         max_train_seconds=cap)
    if lclr and baseline_steps:
        # Cosine period T: the baseline's token count, in steps of this row's starting N (a run that has not
        # arrived by T goes on at LR 0).
        start = settings["aga_start"] if aga else settings["accum"]
        config = replace(config, schedule_steps=max(round(baseline_steps * settings["accum"] / start),
                                                    settings["warmup"] + 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained = train(result, corpus, config)
    history = trained.history
    row = {"row": name, "status": "ok", "passes": list(passes), "aga": aga, "lclr": lclr, "compile_s": round(compile_s, 2),
           "steps": trained.steps, "tokens": trained.tokens, "train_s": round(trained.train_seconds, 2),
           "final_val_loss": trained.final_val_loss, "validation": trained.validation,
           "tokens_per_s": trained.tokens / max(trained.train_seconds, 1e-9),
           "mean_accum": sum(h["accum"] for h in history) / max(len(history), 1),
           "peak_mem_gib": max((h.get("peak_mem_bytes", 0) for h in history), default=0) / 2**30}
    if quality:
        row["equal_steps"] = True
    if "sas" in passes:  # the kept share of the causal tiles, to compare patterns at equal density
        record = result.report.record("sas")
        row["sas"] = {"summary": record.details.get("summary"), "density": record.stats.get("density")}
    return row


def warm_up(settings: dict[str, Any], corpus: Any, device: torch.device) -> None:
    """A few untimed steps first, so that the baseline does not pay for CUDA/cuBLAS initialisation."""
    from effcompile.train import TrainConfig, train

    config = TrainConfig(steps=3, batch=settings["batch"], seq=settings["model"]["seq"], lr=settings["lr"],
                         eval_every=0, eval_batches=1)
    train(build((), settings, device), corpus, config)


def fill_target(row: dict[str, Any], target: float, baseline_s: float | None, baseline_tokens: int | None) -> None:
    """Time, steps and tokens to ``target``, the ratio to the baseline, and the validation loss once the row
    has seen the baseline's tokens-to-target (sample efficiency, independent of machine speed)."""
    hit = time_to(row.get("validation", []), target)
    if baseline_tokens is not None:
        seen = next((v for v in row["validation"] if v["tokens"] >= baseline_tokens), None)
        row["val_at_baseline_tokens"] = None if seen is None else seen["val_loss"]
    row["target"] = target
    row["time_to_target_s"] = None if hit is None else round(hit["train_s"], 2)
    row["steps_to_target"] = None if hit is None else hit["step"]
    row["tokens_to_target"] = None if hit is None else hit["tokens"]
    if hit is not None and baseline_s:
        row["speedup_vs_baseline"] = round(baseline_s / hit["train_s"], 3)
        row["time_cut_vs_baseline"] = round(1 - hit["train_s"] / baseline_s, 3)


def print_row(row: dict[str, Any]) -> None:
    if row["status"] != "ok":
        print(f"{row['row']:>9} | {row['status']}", flush=True)
        return
    hit = "not reached" if row.get("time_to_target_s") is None else \
        f"{row['time_to_target_s']:7.1f} s {row['steps_to_target']:5d} steps {row['tokens_to_target']:>11,} tok"
    ratio = f"  ×{row['speedup_vs_baseline']:.2f} (cut {100 * row['time_cut_vs_baseline']:+.0f}%)" \
        if "speedup_vs_baseline" in row else ""
    same_tokens = row.get("val_at_baseline_tokens")
    same = "" if same_tokens is None else f" | val {same_tokens:.4f} at the baseline's tokens"
    sas = f" | sas {row['sas']['density']:.1%} of tiles" if row.get("sas") else ""
    if "val_vs_baseline" in row:
        sas += f", val {100 * row['val_vs_baseline']:+.1f}% vs baseline at equal steps"
    print(f"{row['row']:>9}{sas} | to {row['target']:.4f}: {hit}{ratio}{same} | final val {row['final_val_loss']:.4f} after "
          f"{row['steps']} steps, {row['train_s']:.1f} s, {row['tokens_per_s']:,.0f} tok/s, mean N {row['mean_accum']:.2f}"
          f"{', peak {:.2f} GiB'.format(row['peak_mem_gib']) if row['peak_mem_gib'] else ''}", flush=True)


def plot(rows: list[dict[str, Any]], target: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["status"] == "ok" and row["validation"]:
            axes.plot([v["train_s"] for v in row["validation"]], [v["val_loss"] for v in row["validation"]],
                      label=row["row"], marker=".", markersize=3)
    if target is not None:
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("validation loss (nats/byte)")
    axes.set_title("GPT on the Python standard library (bytes): validation loss vs time")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    settings = setup(args)
    from effcompile.options import parse_set_options

    settings["pass_options"] = parse_set_options(args.set_options)
    from effcompile.train.data import load_corpus

    started = time.perf_counter()
    corpus = load_corpus("stdlib", max_bytes=settings["max_bytes"])
    warm_up(settings, corpus, device)
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    print(f"bench_train: device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, model {settings['model']}, micro-batch {settings['batch']}, accum "
          f"{settings['accum']} (AGA: starts at {settings['aga_start']}, ≤ {settings['max_accum']}), lr {settings['lr']}, "
          f"baseline budget {settings['budget']} s, data "
          f"{corpus.summary()['train_bytes']:,} train bytes", flush=True)
    rows: list[dict[str, Any]] = []
    target, baseline_steps, baseline_s, baseline_tokens = args.target, None, None, None
    for name in ["baseline"] + [n for n in names if n != "baseline"]:
        try:
            left = settings["time_limit"] - (time.perf_counter() - started)
            row = run_row(name, settings, corpus, device, target, baseline_steps, left)
        except Exception as error:  # one failing configuration must not stop the others
            row = {"row": name, "status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            traceback.print_exc(file=sys.stderr)
        if name == "baseline" and row["status"] == "ok":
            baseline_steps = row["steps"]
            if target is None:
                target = min(v["val_loss"] for v in row["validation"])
            hit = time_to(row["validation"], target)
            baseline_s = hit["train_s"] if hit else None
            baseline_tokens = hit["tokens"] if hit else None
        if row["status"] == "ok" and target is not None:
            fill_target(row, target, baseline_s, baseline_tokens)
        if row.get("equal_steps") and rows and rows[0]["row"] == "baseline" and rows[0]["status"] == "ok":
            reference = rows[0]["final_val_loss"]
            row["val_vs_baseline"] = round(row["final_val_loss"] / reference - 1, 4)
        print_row(row)
        rows.append(row)
        if args.out:  # after every row, so that a run cut short still leaves its rows
            write(Path(args.out), device, settings, target, corpus, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nsummary (time = training seconds to the target validation loss; ratio = baseline / row):", flush=True)
    for row in rows:
        print_row(row)
    together = next((r for r in rows if r["row"] == "all"), None)
    if together and together.get("time_cut_vs_baseline") is not None:
        print(f"all together vs baseline: time to target cut by {100 * together['time_cut_vs_baseline']:.0f}% "
              "(published claim for this recipe: 47%)", flush=True)
    elif together:
        print(f"all together vs baseline: {together.get('status')}, target "
              f"{'not reached' if together.get('status') == 'ok' else 'not measured'}", flush=True)
    if args.out:
        write(Path(args.out), device, settings, target, corpus, rows)
        print(f"wrote {Path(args.out) / 'bench_train.json'} and {Path(args.out) / 'bench_train.png'}", flush=True)
    return 0


def write(out: Path, device: torch.device, settings: dict[str, Any], target: float | None, corpus: Any,
          rows: list[dict[str, Any]]) -> None:
    """``bench_train.json`` (settings, target, every row with its validation curve) and the PNG."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": str(device), "torch": torch.__version__, "settings": settings, "target": target,
              "corpus": corpus.summary(), "rows": rows}
    (out / "bench_train.json").write_text(json.dumps(report, indent=2, default=str))
    plot(rows, target, out / "bench_train.png")


if __name__ == "__main__":
    sys.exit(main())
