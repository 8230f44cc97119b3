"""Benchmark ``fuse`` (and ``amp float8``) against the peers' best practice, every row in one run.

Section ``lora`` — TinyLlama-1.1B shapes (bench_lora's model), batch 4 × 2048, LoRA r16 (alpha 32) on all
linears, AdamW over the adapters, autocast bf16:

  peft_bf16             PEFT on the model loaded in bf16 (how most users load it)
  peft_bf16_liger       + Liger-Kernel (``apply_liger_kernel_to_llama``: RMSNorm, SwiGLU, RoPE, fused linear+CE)
  peft_bf16_liger_ac    + per-block checkpointing (HF ``gradient_checkpointing_enable``)
  peft_bf16_compiled    PEFT bf16, ``torch.compile``
  lora / lora_c         effcompile ``lora`` (bf16 base: ``base_dtype=bfloat16``), eager / compiled
  fuse / fuse_c         effcompile ``lora,fuse``, eager / compiled
  fuse_remat            effcompile ``lora,fuse,remat`` (``--remat``: a budget, or ``blocks``)
  fuse16 / fuse16_c / fuse16_remat   the same on the model loaded in bf16 like the peers (same numerics as theirs)

effcompile rows capture ``model(input_ids, labels=...).loss`` (the training step's objective; with
``--logits`` the full output, logits included), as Liger's patched forward skips the logits in training.

Section ``float8`` — a Llama-3-8B-shaped slice (d4096, ff14336, 32/8 heads, 4 layers, vocab 128256), seq 8192,
batch 1, fused AdamW over every parameter, compiled, one fixed batch for ``--float8-steps`` steps:

  f8_bf16            the HF model under autocast bf16, ``torch.compile``
  f8_torchao         + torchao ``convert_to_float8_training`` (tensorwise; lm_head and non-multiple-of-16 skipped)
  f8_amp_tensorwise / f8_amp_rowwise   effcompile ``amp dtype=float8`` (first/last and <2k-wide linears bf16)

Per row: median and min/max ms of the timed steps (each synchronised), peak ``torch.cuda.max_memory_allocated``
over them, the last loss (float8: after ``--float8-steps`` steps, vs f8_bf16's). Ratios against the peers in
the same run. Writes ``$OUT/bench_fuse.json`` and ``$OUT/bench_fuse.png`` when ``OUT`` is set. ``--quick``:
tiny shapes, a few steps (CPU smoke run: the Liger, compiled and float8 rows are skipped without CUDA).

    python3 tools/bench_fuse.py --section lora
    python3 tools/bench_fuse.py --section float8
    python3 tools/bench_fuse.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lora import ALPHA, FULL, LINEARS, QUICK, RANK, Shapes, _free, _sync, build_llama  # noqa: E402

LORA_ROWS = ("peft_bf16", "peft_bf16_compiled", "lora", "lora_c", "fuse", "fuse_c", "fuse_remat", "fuse16",
             "fuse16_c", "fuse16_remat", "peft_bf16_liger", "peft_bf16_liger_ac")  # Liger patches HF: last
FLOAT8_ROWS = ("f8_bf16", "f8_torchao", "f8_amp_tensorwise", "f8_amp_rowwise")
F8 = Shapes(4, 4096, 14336, 32, 8, 128256, 1, 8192)
F8_QUICK = Shapes(2, 128, 256, 4, 2, 512, 1, 64)


class LossOnly(torch.nn.Module):
    """``model(input_ids, labels=labels).loss``: what a training step reads."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=labels).loss


def measure_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` synchronised steps; median/min/max ms, peak GiB over the timed steps, losses."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        loss = step()
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "steps": steps,
            "peak_gib": peak, "first_loss": losses[0], "last_loss": losses[-1]}


def training_step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, autocast: bool = True,
                  lr: float = 1e-4) -> Callable[[], torch.Tensor]:
    """One AdamW step over ``model``'s trainable parameters (autocast bf16 when ``autocast``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ------------------------------------------------------------------------------------------ LoRA rows

def peft_model(shapes: Shapes, device: torch.device, liger: bool = False, checkpoint: bool = False) -> torch.nn.Module:
    """The anchors' recipe: bf16 model, frozen, PEFT LoRA r16 on all linears, adapters in float32."""
    from peft import LoraConfig, get_peft_model

    model = build_llama(shapes, device).to(torch.bfloat16)
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LINEARS), lora_dropout=0.0))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def with_liger(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build under ``apply_liger_kernel_to_llama``, then undo its patch so later rows see plain HF classes."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward
    apply_liger_kernel_to_llama()
    try:
        return build()
    finally:
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = forward


def ours(shapes: Shapes, device: torch.device, ids: torch.Tensor, passes: list[str], bf16_model: bool,
         remat: str, logits: bool) -> torch.nn.Module:
    """effcompile: capture (loss only unless ``logits``), then ``passes`` (lora r16 all linears; a bf16 base)."""
    from effcompile.capture import capture
    from effcompile.pass_manager import PassManager, resolve_passes
    from effcompile.spec import ModelSpec

    model = build_llama(shapes, device)
    if bf16_model:
        model = model.to(torch.bfloat16)
    target = model if logits else LossOnly(model)
    program = capture(ModelSpec(target, (), {"input_ids": ids, "labels": ids}, None, "llama"))
    del model, target
    options: dict[str, dict[str, Any]] = {"lora": {"rank": RANK, "alpha": ALPHA, "targets": ",".join(LINEARS),
                                                   **({} if bf16_model else {"base_dtype": "bfloat16"})}}
    if "remat" in passes:
        options["remat"] = {"policy": "blocks"} if remat == "blocks" else {"budget": float(remat)}
        if device.type == "cuda":
            options["remat"]["autocast"] = "bfloat16"
    run = PassManager(resolve_passes(passes, options), verify=False, measure=False).run(program)
    for record in run.records:
        print(f"  {record.name}: {record.details.get('summary', record.reason)}", flush=True)
    return run.program.gm


def lora_builders(args: argparse.Namespace) -> dict[str, tuple[str, Callable[..., torch.nn.Module], bool]]:
    """Row name → (label, builder(shapes, device, ids), compiled)."""
    def mine(passes, bf16_model=False):
        return lambda s, d, i: ours(s, d, i, passes, bf16_model, args.remat, args.logits)

    fuse, remat = ["lora", "fuse"], ["lora", "fuse", "remat"]
    return {
        "peft_bf16": ("PEFT, bf16 base", lambda s, d, i: peft_model(s, d), False),
        "peft_bf16_liger": ("PEFT, bf16 base + Liger", lambda s, d, i: with_liger(lambda: peft_model(s, d)), False),
        "peft_bf16_liger_ac": ("PEFT, bf16 + Liger + per-block ckpt",
                               lambda s, d, i: with_liger(lambda: peft_model(s, d, checkpoint=True)), False),
        "peft_bf16_compiled": ("PEFT, bf16 base, torch.compile", lambda s, d, i: peft_model(s, d), True),
        "lora": ("effcompile lora (bf16 base)", mine(["lora"]), False),
        "lora_c": ("effcompile lora (bf16 base), compiled", mine(["lora"]), True),
        "fuse": ("effcompile lora,fuse", mine(fuse), False),
        "fuse_c": ("effcompile lora,fuse, compiled", mine(fuse), True),
        "fuse_remat": (f"effcompile lora,fuse,remat {args.remat}", mine(remat), False),
        "fuse16": ("effcompile lora,fuse (bf16 model)", mine(fuse, True), False),
        "fuse16_c": ("effcompile lora,fuse (bf16 model), compiled", mine(fuse, True), True),
        "fuse16_remat": (f"effcompile lora,fuse,remat {args.remat} (bf16 model)", mine(remat, True), False),
    }


# ---------------------------------------------------------------------------------------- float8 rows

def float8_builders() -> dict[str, tuple[str, Callable[..., torch.nn.Module], bool]]:
    """Row name → (label, builder(shapes, device, ids), compiled); every row compiled."""
    def torchao(shapes, device, ids):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        model = build_llama(shapes, device)
        keep = lambda module, name: ("lm_head" not in name and module.in_features % 16 == 0  # noqa: E731
                                     and module.out_features % 16 == 0)
        return convert_to_float8_training(model, module_filter_fn=keep,
                                          config=Float8LinearConfig.from_recipe_name("tensorwise"))

    def amp(recipe):
        def build(shapes, device, ids):
            from effcompile.capture import capture
            from effcompile.pass_manager import PassManager, resolve_passes
            from effcompile.spec import ModelSpec

            program = capture(ModelSpec(LossOnly(build_llama(shapes, device)), (), {"input_ids": ids, "labels": ids},
                                        None, "llama"))
            options = {"amp": {"dtype": "float8", "float8_recipe": recipe, "compare_autocast": False}}
            run = PassManager(resolve_passes(["amp"], options), verify=False, measure=False).run(program)
            print(f"  amp: {run.records[0].details.get('summary')}", flush=True)
            return run.program.gm
        return build

    return {"f8_bf16": ("HF Llama-8B slice, autocast bf16, compiled", lambda s, d, i: build_llama(s, d), True),
            "f8_torchao": ("+ torchao convert_to_float8_training (tensorwise)", torchao, True),
            "f8_amp_tensorwise": ("effcompile amp float8 (tensorwise)", amp("tensorwise"), True),
            "f8_amp_rowwise": ("effcompile amp float8 (rowwise)", amp("rowwise"), True)}


# ------------------------------------------------------------------------------------------ the run

def run_rows(names: list[str], builders: dict, shapes: Shapes, device: torch.device, steps: int, warmup: int,
             started: float, budget: float, autocast_of: Callable[[str], bool], lr: float) -> list[dict[str, Any]]:
    """Build, (compile,) train and measure each row; a failing row is recorded and the others go on."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shapes.vocab, (shapes.batch, shapes.seq), generator=generator).to(device)
    rows = []
    for name in names:
        label, build, compiled = builders[name]
        row: dict[str, Any] = {"row": name, "label": label, "compiled": compiled}
        if time.perf_counter() - started > budget:
            row["error"] = f"skipped: past --time-budget {budget:g} s"
        elif (compiled or "liger" in name or name.startswith("f8_")) and device.type != "cuda":
            row["error"] = "skipped: needs CUDA"
        else:
            model = None
            try:
                begun = time.perf_counter()
                model = build(shapes, device, ids)
                row["build_s"] = time.perf_counter() - begun
                if compiled:
                    model = torch.compile(model)
                step = training_step(model, ids, device, autocast=autocast_of(name), lr=lr)
                row.update(measure_steps(step, device, steps, warmup))
            except Exception as error:  # one failing row must not stop the others
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
                traceback.print_exc(limit=4, file=sys.stdout)
            del model
            _free(device)
            torch._dynamo.reset()
        print(_line(row), flush=True)
        rows.append(row)
    return rows


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['label']:48s} {row['error']}"
    return (f"{row['label']:48s} {row['ms_median']:8.1f} ms [{row['ms_min']:.1f}–{row['ms_max']:.1f}]  "
            f"peak {row['peak_gib']:6.2f} GiB  loss {row['first_loss']:.4f} → {row['last_loss']:.4f}")


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals as ratios within this run (lines to print)."""
    by = {r["row"]: r for r in rows if "error" not in r}
    lines = []

    def compare(mine: str, peer: str, goal: str) -> None:
        if mine in by and peer in by:
            a, b = by[mine], by[peer]
            lines.append(f"{a['label']} / {b['label']}: time {a['ms_median'] / b['ms_median']:.3f}×, "
                         f"peak {a['peak_gib'] / b['peak_gib']:.3f}×  ({goal})")

    for mine in ("fuse", "fuse_remat", "fuse16", "fuse16_remat"):
        compare(mine, "peft_bf16_liger", "goal: time ≤ 0.95× at ≤ 1.00× peak")
    for mine in ("fuse_remat", "fuse16_remat"):
        compare(mine, "peft_bf16_liger_ac", "goal at ≤ 4.0 GiB: time ≤ 0.8×")
    for mine in ("fuse_c", "fuse16_c", "lora_c"):
        compare(mine, "peft_bf16_compiled", "goal: time ≤ 0.75× at ≤ 1.00× peak")
    base = by.get("f8_bf16")
    for name in ("f8_torchao", "f8_amp_tensorwise", "f8_amp_rowwise"):
        if base and name in by:
            row = by[name]
            lines.append(f"{row['label']}: speed-up {base['ms_median'] / row['ms_median']:.3f}× over bf16, loss after "
                         f"{row['steps'] + 2} steps {row['last_loss']:.4f} vs {base['last_loss']:.4f} "
                         f"({100 * (row['last_loss'] / base['last_loss'] - 1):+.2f}%)  (goal ≥ 1.2× and ≥ torchao's; ±1%)")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Step time and peak memory per row (bars), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r]
    if not good:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(good) + 1.5))
    labels = [r["label"] for r in good]
    axes[0].barh(labels, [r["ms_median"] for r in good],
                 xerr=[[r["ms_median"] - r["ms_min"] for r in good], [r["ms_max"] - r["ms_median"] for r in good]])
    axes[0].set_xlabel("ms / step (median, min–max)")
    axes[1].barh(labels, [r["peak_gib"] for r in good], color="tab:orange")
    axes[1].set_xlabel("peak GiB")
    axes[1].set_yticklabels([])
    for axis in axes:
        axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Parse, run the chosen section(s), print rows and ratios, write JSON/PNG under ``$OUT``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--section", choices=("lora", "float8", "all"), default="all")
    parser.add_argument("--rows", default="", help=f"comma-separated subset of {','.join(LORA_ROWS + FLOAT8_ROWS)}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed LoRA steps (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)")
    parser.add_argument("--float8-steps", type=int, default=None, help="float8 training steps (default 50; quick 3)")
    parser.add_argument("--remat", default="blocks", help="the remat rows' budget (a fraction) or 'blocks'")
    parser.add_argument("--logits", action="store_true", help="our rows capture the full output (logits too)")
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds; rows not started by then are skipped")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in LORA_ROWS + FLOAT8_ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(LORA_ROWS + FLOAT8_ROWS)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}", flush=True)
    started, rows = time.perf_counter(), []
    steps, warmup = args.steps or (2 if args.quick else 10), args.warmup or (1 if args.quick else 3)
    if args.section in ("lora", "all"):
        names = [r for r in LORA_ROWS if not chosen or r in chosen]
        shapes = QUICK if args.quick else FULL
        print(f"LoRA: Llama {shapes.layers}L d{shapes.hidden}, batch {shapes.batch} × {shapes.seq}; {steps} timed "
              f"steps after {warmup}", flush=True)
        rows += run_rows(names, lora_builders(args), shapes, device, steps, warmup, started, args.time_budget,
                         lambda name: True, 1e-4)
    if args.section in ("float8", "all"):
        names = [r for r in FLOAT8_ROWS if not chosen or r in chosen]
        shapes = F8_QUICK if args.quick else F8
        total = args.float8_steps or (3 if args.quick else 50)
        print(f"float8: Llama {shapes.layers}L d{shapes.hidden} ff{shapes.ffn}, seq {shapes.seq}; {total} steps "
              f"(timed: the last {total - 2})", flush=True)
        rows += run_rows(names, float8_builders(), shapes, device, total - 2, 2, started, args.time_budget,
                         lambda name: True, 3e-4)
    print()
    for line in ratios(rows):
        print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        payload = {"device": str(device), "torch": torch.__version__, "steps": steps, "warmup": warmup, "rows": rows,
                   "ratios": ratios(rows), "options": vars(args)}
        (Path(out) / "bench_fuse.json").write_text(json.dumps(payload, indent=2))
        plot(rows, Path(out) / "bench_fuse.png")
        print(f"wrote {Path(out) / 'bench_fuse.json'} and bench_fuse.png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
