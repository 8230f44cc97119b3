"""Benchmark the ``lora`` pass: peak memory and step time of fine-tuning a Llama-style ~1.1B model.

Configurations, all measured in the same run on the same random weights (TinyLlama-1.1B shapes:
22 layers, d2048, ff5632, 32/4 heads, vocab 32000; batch 4 × seq 2048; autocast bf16; fused AdamW):

  full          full fine-tuning, float32 parameters (the reference for memory)
  peft          PEFT LoRA r16 (alpha 32) on all linears (the reference for step time)
  ours          effcompile ``lora`` r16 on the same linears, float32 base (same setting as PEFT)
  ours_bf16     ``lora`` with ``base_dtype=bfloat16``: the frozen base stored in bf16
  ours_bf16_remat  ``lora`` (bf16 base) followed by ``remat`` (budget 0.7; ``ours_bf16_remat0.6``: budget 0.6)
  ours_bf16_masked ``ours_bf16`` keeping the explicit causal mask ``torch.export`` materialised

Our rows run the captured graph; export turns Hugging Face's ``is_causal=True, enable_gqa=True`` SDPA
call into one with an explicit boolean mask (no flash kernel) on ``repeat_kv`` copies, and capture gives
SDPA its eager arguments back when the mask is provably the causal one (``effcompile.canonical``; exact) —
``ours_bf16_masked`` turns that off to show what it is worth.

Prints one row per configuration as soon as it is measured (ms/step, peak GiB, trainable parameters,
first-step loss), then the ratios (peak ÷ full fine-tuning, ms ÷ PEFT). Writes the rows as JSON to
``$OUT/bench_lora.json`` when ``OUT`` is set. ``--quick`` uses tiny shapes (runs on CPU in seconds).

    python3 tools/bench_lora.py --device cuda
    python3 tools/bench_lora.py --quick
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
REMAT_BUDGET = 0.7  # the budget that meets both goals in the same run (0.5: 0.308 of the memory, 1.04× PEFT)
CONFIGS = ("full", "peft", "ours_bf16", "ours_bf16_remat", "ours", "ours_bf16_masked")  # by priority


@dataclass
class Shapes:
    """Model and batch shapes."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int


FULL = Shapes(22, 2048, 5632, 32, 4, 32000, 4, 2048)
QUICK = Shapes(2, 128, 256, 4, 2, 512, 2, 64)


def build_llama(shapes: Shapes, device: torch.device) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` created directly on ``device`` (seed 0)."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        hidden_size=shapes.hidden, intermediate_size=shapes.ffn, num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads, vocab_size=shapes.vocab,
        max_position_embeddings=shapes.seq, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(config)
    return model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, steps: int,
            warmup: int) -> dict[str, Any]:
    """Train ``model`` for ``warmup`` + ``steps`` AdamW steps under autocast bf16; return ms/step (mean of
    the timed steps), peak allocated GiB over the timed steps, trainable parameters and the first loss."""
    gc.collect()  # what building the configuration dropped (GraphModules sit in reference cycles) must not count
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    losses: list[float] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    ms = (time.perf_counter() - started) / steps * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms_per_step": ms, "peak_gib": peak, "trainable_params": sum(p.numel() for p in params),
            "first_loss": losses[0], "last_loss": losses[-1]}


def make_full(shapes: Shapes, device: torch.device, ids: torch.Tensor) -> torch.nn.Module:
    """The Hugging Face model itself, every parameter trainable."""
    return build_llama(shapes, device)


def make_peft(shapes: Shapes, device: torch.device, ids: torch.Tensor) -> torch.nn.Module:
    """PEFT LoRA r16 / alpha 32 on all linears."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LINEARS), lora_dropout=0.0)
    return get_peft_model(build_llama(shapes, device), config)


def make_ours(passes: list[str], extra: dict[str, Any], causal: bool = True, budget: float = REMAT_BUDGET,
              cost: str = "time") -> Callable[[Shapes, torch.device, torch.Tensor], torch.nn.Module]:
    """A builder compiling the model with effcompile ``passes`` (lora r16 / alpha 32 on all linears).
    ``causal``: let capture give SDPA ``is_causal=True`` instead of the explicit causal mask export
    materialised (False keeps the mask: the ``ours_bf16_masked`` row)."""

    def build(shapes: Shapes, device: torch.device, ids: torch.Tensor) -> torch.nn.Module:
        from effcompile.capture import capture
        from effcompile.pass_manager import PassManager, resolve_passes
        from effcompile.spec import ModelSpec

        model = build_llama(shapes, device)
        inputs = {"input_ids": ids, "labels": ids}
        program = capture(ModelSpec(model, (), inputs, None, "llama"), canonical=causal)
        del model
        if causal:
            print(f"  ({program.meta['causal_sdpa']} SDPA calls given is_causal=True and enable_gqa at capture, "
                  "as eager HF calls them)", flush=True)
        lora = {"rank": RANK, "alpha": ALPHA, "targets": ",".join(LINEARS), **extra}
        program = PassManager(resolve_passes(["lora"], {"lora": lora}), verify=False, measure=False).run(program).program
        for name in passes:
            if name != "lora":
                # plan for what bf16 autocast training saves (the rows run under autocast on CUDA)
                remat = {"budget": budget, "cost": cost, **({"autocast": "bfloat16"} if device.type == "cuda" else {})}
                options = {"remat": remat} if name == "remat" else {}
                manager = PassManager(resolve_passes([name], options), verify=False, measure=False)
                program = manager.run(program).program
        return program.gm

    return build


BUILDERS: dict[str, tuple[str, Callable[..., torch.nn.Module]]] = {
    "full": ("full fine-tuning (fp32 params, autocast bf16)", make_full),
    "peft": (f"PEFT LoRA r{RANK} all linears", make_peft),
    "ours": (f"effcompile lora r{RANK} all linears", make_ours(["lora"], {})),
    "ours_bf16": (f"effcompile lora r{RANK} + base_dtype=bfloat16", make_ours(["lora"], {"base_dtype": "bfloat16"})),
    "ours_bf16_remat": (f"effcompile lora r{RANK} bf16 base + remat {REMAT_BUDGET}",
                        make_ours(["lora", "remat"], {"base_dtype": "bfloat16"})),
    "ours_bf16_masked": (f"effcompile lora r{RANK} bf16 base, captured mask",
                         make_ours(["lora"], {"base_dtype": "bfloat16"}, causal=False)),
}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add to each measured row its peak memory ÷ full fine-tuning's (``peak_vs_full``) and its step time ÷
    PEFT LoRA's (``ms_vs_peft``) where those rows ran, and print them."""
    by_name = {r["config"]: r for r in rows if "error" not in r}
    full, peft = by_name.get("full"), by_name.get("peft")
    print("\nratios (memory vs full fine-tuning, time vs PEFT LoRA; goals: memory ≤ 0.40, time ≤ 1.02)", flush=True)
    for row in rows:
        if "error" in row:
            continue
        if full and full["peak_gib"] == full["peak_gib"] and full["peak_gib"] > 0:
            row["peak_vs_full"] = row["peak_gib"] / full["peak_gib"]
        if peft:
            row["ms_vs_peft"] = row["ms_per_step"] / peft["ms_per_step"]
        print(f"{row['label']:48s} peak/full {row.get('peak_vs_full', float('nan')):6.3f}   "
              f"ms/PEFT {row.get('ms_vs_peft', float('nan')):6.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the configurations one after another; print and (with ``$OUT``) save the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU, seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6; quick 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--time-budget", type=float, default=210.0,
                        help="seconds; configurations not started by then are skipped (the run stays under 4 min)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = QUICK if args.quick else FULL
    steps = args.steps or (2 if args.quick else 6)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for name in names:  # ours_bf16_remat<budget>[flops]: the remat row at another budget (and cost model),
        # e.g. ours_bf16_remat0.6, ours_bf16_remat0.7flops
        if name.startswith("ours_bf16_remat") and name not in BUILDERS:
            spec = name.removeprefix("ours_bf16_remat")
            cost = "flops" if spec.endswith("flops") else "time"
            try:
                budget = float(spec.removesuffix("flops"))
            except ValueError:
                continue
            BUILDERS[name] = (f"effcompile lora r{RANK} bf16 base + remat {budget:g}" + (" (flops)" if cost == "flops" else ""),
                              make_ours(["lora", "remat"], {"base_dtype": "bfloat16"}, budget=budget, cost=cost))
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}", flush=True)
    print(f"Llama {shapes.layers}L d{shapes.hidden} ff{shapes.ffn} {shapes.heads}/{shapes.kv_heads} heads vocab "
          f"{shapes.vocab}; batch {shapes.batch} × seq {shapes.seq}; {steps} timed steps after {args.warmup}", flush=True)
    print(f"{'configuration':48s} {'ms/step':>9s} {'peak GiB':>9s} {'trainable':>12s} {'loss@1':>8s} {'build s':>8s}",
          flush=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shapes.vocab, (shapes.batch, shapes.seq), generator=generator).to(device)
    rows: list[dict[str, Any]] = []
    run_started = time.perf_counter()
    for name in names:
        label, builder = BUILDERS[name]
        row: dict[str, Any] = {"config": name, "label": label}
        if time.perf_counter() - run_started > args.time_budget:
            row["error"] = f"skipped: the run passed --time-budget {args.time_budget:g} s"
            print(f"{label:48s} {row['error']}", flush=True)
            rows.append(row)
            continue
        model = None
        try:
            started = time.perf_counter()
            model = builder(shapes, device, ids)
            row["build_s"] = time.perf_counter() - started
            _free(device)
            row.update(measure(model, ids, device, steps, args.warmup))
            print(f"{label:48s} {row['ms_per_step']:9.1f} {row['peak_gib']:9.2f} {row['trainable_params']:12,d} "
                  f"{row['first_loss']:8.4f} {row['build_s']:8.1f}", flush=True)
        except Exception as error:  # one failing configuration must not stop the others
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
            print(f"{label:48s} FAILED: {row['error']}", flush=True)
            traceback.print_exc(limit=3, file=sys.stdout)
        rows.append(row)
        del model
        _free(device)
    add_ratios(rows)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        payload = {"shapes": shapes.__dict__, "steps": steps, "warmup": args.warmup, "device": str(device),
                   "torch": torch.__version__, "rows": rows}
        (Path(out) / "bench_lora.json").write_text(json.dumps(payload, indent=2))
        print(f"wrote {Path(out) / 'bench_lora.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
