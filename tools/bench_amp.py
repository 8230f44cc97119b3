"""Benchmark the ``amp`` pass against ``torch.autocast`` on a GPT-2-medium-sized training step.

Model: Hugging Face GPT-2, 24 layers, d=1024, 16 heads, vocab 50304, batch 8, seq 1024, dropout 0,
fused AdamW. Configurations (each measured in the same run, fresh weights from one seed):

  float32 (TF32 off), TF32, autocast bf16 (the Hugging Face model), autocast bf16 on the captured
  graph (the graph ``amp`` starts from, eager: shows what capture alone costs), amp bf16 — eager, and
  autocast / amp again under ``torch.compile`` (``--all`` adds the captured graph compiled).

Prints one row per configuration as soon as it is measured (ms/step, peak GiB, MFU against the
H100/H200 dense bf16 peak of 989 TFLOP/s with FLOPs = 6·N·tokens + 12·L·d·seq·tokens), then the
ratios amp / autocast. Writes ``$OUT/bench_amp.json`` when ``OUT`` is set.

    python3 tools/bench_amp.py --device cuda      # ≤ 4 min on an H200
    python3 tools/bench_amp.py --quick            # tiny shapes on CPU (checks the script end to end)
"""

from __future__ import annotations

import argparse
import contextlib
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, FLOP/s
FULL = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50304, n_positions=1024, batch=8, seq=1024)
QUICK = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, batch=2, seq=64)


def build_model(shape: dict[str, int], device: str, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A fresh GPT-2 LM (dropout 0, SDPA attention) on ``device``; loads ``state`` if given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                        vocab_size=shape["vocab_size"], n_positions=shape["n_positions"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    if state is not None:
        model.load_state_dict(state)
    return model.train()


def flops_per_step(shape: dict[str, int], params: int) -> float:
    """Training FLOPs of one step: 6·N per token (N without position embeddings) plus attention's
    12·L·d·seq per token (forward + backward, full score matrix)."""
    tokens = shape["batch"] * shape["seq"]
    n = params - shape["n_positions"] * shape["n_embd"]
    return 6.0 * n * tokens + 12.0 * shape["n_layer"] * shape["n_embd"] * shape["seq"] * tokens


def _loss(output: Any) -> torch.Tensor:
    return output["loss"] if not hasattr(output, "loss") else output.loss


def measure(module: torch.nn.Module, batch: dict[str, torch.Tensor], device: str, steps: int, warmup: int,
            autocast: bool) -> tuple[float, float]:
    """Train ``module`` for ``warmup`` then ``steps`` steps; return (ms per step, peak GiB of the timed steps)."""
    gc.collect()  # what building the configuration dropped (GraphModules sit in reference cycles) must not count
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device == "cuda")
    context: Callable[[], Any] = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast \
        else contextlib.nullcontext

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = _loss(module(**batch))  # drop the output (logits) before backward, as training loops do
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(warmup):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        last = step()
    _sync(device)
    elapsed = (time.perf_counter() - started) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if not torch.isfinite(last):
        raise RuntimeError(f"loss is {float(last)}")
    return elapsed, peak


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def captured(model: torch.nn.Module, batch: dict[str, torch.Tensor], passes: list[str],
             verify: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model captured (and rewritten by ``passes``) by effcompile, with the pass records."""
    import effcompile
    from effcompile.passes.amp import relax_dtype_asserts

    result = effcompile.compile(model, batch, passes=passes, verify=verify, measure=False)
    if not passes:  # to run under torch.autocast, the captured graph must not pin float32 dtypes
        relax_dtype_asserts(result.module.graph)
        result.module.recompile()
    records = {r.name: {"summary": r.details.get("summary"), "verify": r.verify.to_dict() if r.verify else None,
                        "autocast": r.details.get("autocast")} for r in result.report.records}
    return result.module, records


def amp_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """``amp``'s step time and peak memory ÷ autocast's (eager and compiled, against the original module and
    the captured graph) where both ran, printed with the goal (time ≤ 1.03x, memory ≤ 1.00x)."""
    by_name = {r["configuration"]: r for r in rows if "ms_per_step" in r}
    ratios: dict[str, float | None] = {}
    for mode in ("eager", "compiled"):
        amp = by_name.get(f"amp bf16 {mode}")
        for reference in (f"autocast bf16 {mode}", f"autocast bf16 {mode} (captured graph)"):
            ref = by_name.get(reference)
            if amp and ref:
                time_ratio = amp["ms_per_step"] / ref["ms_per_step"]
                memory_ratio = amp["peak_gib"] / ref["peak_gib"] if ref["peak_gib"] else float("nan")
                ratios[f"{mode}: amp / {reference}"] = round(time_ratio, 4)
                ratios[f"{mode}: amp / {reference} (peak memory)"] = round(memory_ratio, 4) \
                    if memory_ratio == memory_ratio else None
                verdict = "meets" if time_ratio <= 1.03 and not memory_ratio > 1.0 else "misses"
                memory = f"{memory_ratio:.3f}x" if memory_ratio == memory_ratio else "not measured on this device"
                print(f"amp / {reference}: time {time_ratio:.3f}x, peak memory {memory} "
                      f"({verdict} the goal: time ≤ 1.03x, memory ≤ 1.00x)", flush=True)
    return ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``--quick``: tiny shapes, CPU-friendly)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU-friendly)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--all", action="store_true", help="also autocast on the captured graph under torch.compile "
                        "(one more compilation, about a minute)")
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print rows and ratios, write JSON; returns the exit code."""
    args = parse_args(argv)
    device = args.device
    shape = QUICK if args.quick else FULL
    steps = args.steps or (3 if args.quick else 10)
    torch.manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    batch = {"input_ids": ids, "labels": ids}
    state = {k: v.detach().cpu().clone() for k, v in build_model(shape, "cpu", None).state_dict().items()}
    params = sum(v.numel() for k, v in state.items() if k.endswith(("weight", "bias")) and "lm_head" not in k)
    step_flops = flops_per_step(shape, params)
    print(f"# GPT-2 {shape}, device {device}, torch {torch.__version__}, {params / 1e6:.1f}M params, "
          f"{step_flops / 1e12:.2f} TFLOP/step, {steps} timed steps after {args.warmup} warm-up", flush=True)
    print(f"{'configuration':<40} {'ms/step':>9} {'peak GiB':>9} {'MFU':>7}", flush=True)

    def plain() -> Callable[[], torch.nn.Module]:
        return lambda: build_model(shape, device, state)

    def graph(passes: list[str]) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            module, records = captured(build_model(shape, device, state), batch, passes, verify=bool(passes))
            extra["records"] = records
            return module
        return make

    extra: dict[str, Any] = {}
    configs: list[tuple[str, Callable[[], torch.nn.Module], bool, bool, bool]] = [
        # name, build, autocast, tf32, compiled
        ("float32 eager", plain(), False, False, False),
        ("tf32 eager", plain(), False, True, False),
        ("autocast bf16 eager", plain(), True, False, False),
        ("autocast bf16 eager (captured graph)", graph([]), True, False, False),
        ("amp bf16 eager", graph(["amp"]), False, False, False),
    ]
    if not args.no_compile:
        configs += [
            ("autocast bf16 compiled", plain(), True, False, True),
            ("amp bf16 compiled", graph(["amp"]), False, False, True),
        ]
        if args.all:
            configs.insert(-1, ("autocast bf16 compiled (captured graph)", graph([]), True, False, True))
    rows: list[dict[str, Any]] = []
    for name, build, autocast, tf32, compiled in configs:
        row: dict[str, Any] = {"configuration": name}
        extra.clear()
        started = time.perf_counter()
        try:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            module = build()
            if compiled:
                module = torch.compile(module)
            ms, peak = measure(module, batch, device, steps, args.warmup, autocast)
            row.update(ms_per_step=round(ms, 2), peak_gib=round(peak, 3) if peak == peak else None, mfu=round(step_flops / (ms / 1e3) /
                                                                                        PEAK_BF16_FLOPS, 4))
            if "records" in extra:
                row["records"] = extra["records"]
            print(f"{name:<40} {ms:9.1f} {peak:9.2f} {row['mfu']:7.1%}", flush=True)
        except Exception as error:  # one configuration failing must not stop the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            print(f"{name:<40} FAILED {row['error']}", flush=True)
            traceback.print_exc(limit=3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            module = None
            _cleanup(device)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)

    ratios = amp_ratios(rows)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_amp.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"shape": shape, "device": device, "torch": torch.__version__,
                                    "flops_per_step": step_flops, "rows": rows, "ratios": ratios}, indent=2))
        print(f"# wrote {path}", flush=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
