"""Benchmark the ``sas`` pass: attention kernels, the long-context training step, and quality, each against
dense attention measured in the same run.

``--kernels`` (GPU): one attention forward+backward, bf16, B4 H16 D64, causal, at ``--seqs`` (8192): dense flash
  against every candidate kernel for an importance-style arbitrary tile set at 25% (FlexAttention with several
  kernel options, the ``flash`` kernel over gathered tiles with query groups of 1/2/4 blocks), the ``block``
  pattern's chunked flash, and token-exact local+global through FlexAttention; each row also gives the time to
  build its mask data. Every candidate is first checked against the token-masked reference at a small shape.
``--long`` (GPU): one compiled training step at seq 32k of a Llama-style ~125M model (``bench_sas_models``).
``--quality`` (GPU): validation loss at equal tokens at seq 8k on the bundled byte corpus.
``--cpu``: the block-gather kernel against masked SDPA at seq 2k. ``--quick``: tiny shapes of every chosen
  section, on CPU (a smoke test; with no section chosen, all of them).

Prints one row per configuration as soon as it is measured; with ``OUT`` set, writes ``$OUT/bench_sas.json``.
A failing configuration prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sas_models import ROW_KEYS, global_window, long_step, quality, timed_steps  # noqa: E402

from effcompile.passes.sas.importance import select_important_tiles  # noqa: E402
from effcompile.passes.sas.kernels import reference_attention  # noqa: E402
from effcompile.passes.sas.module import SparseAttention  # noqa: E402
from effcompile.passes.sas.patterns import HeadPattern, TokenMask, head_pattern  # noqa: E402

ROWS: list[dict[str, Any]] = []
STARTED = time.perf_counter()
# FlexAttention kernel options tried on the importance mask (each is one more compilation).
FLEX_VARIANTS: dict[str, dict[str, Any] | None] = {
    "flex": None,  # the module's default (ROWS_GUARANTEED_SAFE for self-attention)
    "flex plain": {},
    "flex fwd 128x128 w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "ROWS_GUARANTEED_SAFE": True},
    "flex bwd 64x128/128x64 w8": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                                  "bwd_num_warps": 8, "ROWS_GUARANTEED_SAFE": True},
    "flex prescale": {"PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": True},
    "flex tma": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True},
}


def emit(row: dict[str, Any]) -> None:
    """Print one result row (flushed) and keep it for the JSON file."""
    ROWS.append(row)
    cells = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
    print(" | ".join(cells), flush=True)


def timed(function: Callable[[], Any], device: str, warmup: int, iters: int) -> list[float]:
    """Milliseconds of ``function()`` over ``iters`` runs after ``warmup`` runs."""
    return timed_steps(function, device, warmup, iters)


def fwd_bwd(attention: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            grad: torch.Tensor) -> Callable[[], None]:
    """A closure running attention forward and backward once."""
    def step() -> None:
        q.grad = k.grad = v.grad = None
        attention(q, k, v).backward(grad)
    return step


def candidates(seq: int, heads: int, block_size: int) -> list[tuple[str, str, Callable[[], SparseAttention]]]:
    """(kernel, mask, module factory) of every candidate at ``seq`` tokens, most telling first: the block
    pattern (chunked flash), the importance-style tile set at 25% (random scores; query groups of 1/2/4
    blocks) through FlexAttention and the flash kernel, token-exact local+global, then FlexAttention's kernel
    options (riskiest last: a kernel that faults the device ends the run)."""
    blocks = math.ceil(seq / block_size)
    scores = torch.rand(heads, blocks, blocks, generator=torch.Generator().manual_seed(0))
    importance = HeadPattern("importance", tiles=True)

    def make(backend: str, group: int, options: dict | None = None) -> SparseAttention:
        return SparseAttention(block_size, True, None, backend=backend, tile_mask=tiles[group],
                               head_patterns=(importance,), kernel_options=options)
    tiles = {group: select_important_tiles(scores, True, 0.25, group) for group in (1, 2, 4)}
    window = global_window(seq, 0.25, block_size, block_size)
    rows: list[tuple[str, str, Callable[[], SparseAttention]]] = [
        ("chunked", "block 25%", lambda: SparseAttention(
            block_size, True, None, backend="chunked", head_patterns=(head_pattern("block", block=seq // 4),))),
        ("flex", "importance 25% group 1", functools.partial(make, "flex", 1)),
    ]
    for group in (1, 2, 4):
        rows.append(("flash", f"importance 25% group {group}", functools.partial(make, "flash", group)))
    for group in (2, 4):
        rows.append(("flex", f"importance 25% group {group}", functools.partial(make, "flex", group)))
    rows.append(("flex", f"local+global 25% (window {window}, {block_size} global)", lambda: SparseAttention(
        block_size, True, None, backend="flex",
        head_patterns=(head_pattern("global", window=window, n_global=block_size),))))
    rows += [(name, "importance 25% group 1", functools.partial(make, "flex", 1, options))
             for name, options in FLEX_VARIANTS.items() if name != "flex"]
    return rows


def check_candidates(device: str, emit_rows: bool = True) -> None:
    """Each candidate against the token-masked reference at a small shape (float32 on CPU, bf16 on CUDA;
    gradients too where the kernel has a backward there)."""
    seq, heads, block_size = (256, 2, 32) if device == "cpu" else (1024, 4, 128)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tolerance = 1e-4 if device == "cpu" else 3e-2
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, seq, 64, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))
    for kernel, mask_name, factory in candidates(seq, heads, block_size):
        try:
            module = factory().to(device)
            backward = device == "cuda" or not kernel.startswith("flex")  # FlexAttention has no CPU backward
            inputs = (q, k, v) if backward else (q.detach(), k.detach(), v.detach())
            out = module(*inputs)
            expected = reference_attention(q.float(), k.float(), v.float(), module.mask, 1 / 8)
            error = float((out.float() - expected).abs().max().detach())
            grad_error = None
            if backward:
                got = torch.autograd.grad(out.float().sum(), (q, k, v))
                want = torch.autograd.grad(expected.sum(), (q, k, v))
                grad_error = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
            ok = error < tolerance and (grad_error is None or grad_error < 10 * tolerance)
            if emit_rows or not ok:
                emit({"section": "check", "kernel": kernel, "mask": mask_name, "device": device, "seq": seq,
                      "max_err": error, "grad_max_err": grad_error, "ok": ok})
        except Exception as error:
            emit({"section": "check", "kernel": kernel, "mask": mask_name, "ok": False,
                  "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})


def bench_kernels(args: argparse.Namespace, device: str) -> None:
    """Every candidate kernel against dense flash SDPA, forward+backward, bf16 (float32 on CPU with --quick);
    each row first checks the candidate against the float32 gather kernel at the same shape (``ok``)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, heads, head_dim = (1, 2, 64) if args.quick else (4, 16, 64)
    block_size = 32 if args.quick else 128
    for seq in ([256] if args.quick else args.seqs):
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
        dense = timed(fwd_bwd(_dense_flash(device), q, k, v, grad), device, 3, args.iters)
        dense_ms = statistics.median(dense)
        emit({"section": "kernels", "kernel": "dense causal SDPA (flash)", "seq": seq, "ms": dense_ms,
              "ms_min": min(dense), "ms_max": max(dense)})
        for kernel, mask_name, factory in candidates(seq, heads, block_size):
            if args.over_budget():
                emit({"section": "kernels", "kernel": kernel, "mask": mask_name, "seq": seq, "skipped": "time budget"})
                continue
            if device == "cpu" and kernel.startswith("flex"):
                continue  # FlexAttention has no CPU backward
            try:
                module = factory().to(device)
                errors = _errors_vs_gather(module, q, k, v, grad)
                times = timed(fwd_bwd(module, q, k, v, grad), device, 3, args.iters)
                build_ms = sum(module.cache.build_ms.values())
                stats = module.mask.stats(seq, seq)
                ms = statistics.median(times)
                emit({"section": "kernels", "kernel": kernel, "mask": mask_name, "seq": seq,
                      "tile_density": round(stats.tile_density, 4), "token_density": round(stats.token_density, 4),
                      "ms": ms, "ms_min": min(times), "ms_max": max(times), "dense_ms": dense_ms,
                      "speedup": dense_ms / ms, "mask_build_ms": build_ms, **errors})
            except Exception as error:  # one configuration failing must not stop the others
                emit({"section": "kernels", "kernel": kernel, "mask": mask_name, "seq": seq,
                      "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
                traceback.print_exc(limit=2)
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
        if device == "cuda" and not args.over_budget():
            _create_block_mask_reference(seq, heads, block_size, dense_ms)


def _errors_vs_gather(module: SparseAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      grad: torch.Tensor) -> dict[str, Any]:
    """Output and gradient errors of ``module`` against the float32 block-gather kernel on the same mask and
    inputs (the gather kernel equals the token-masked reference in the tests), relative to the reference's
    largest value; ``ok`` within bf16 tolerances."""
    reference = SparseAttention(module.block_size, module.causal, None, backend="gather", tile_mask=module.tile_mask,
                                head_patterns=module.head_patterns)
    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = reference(*inputs)
    expected.backward(grad.float())
    got_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    got = module(*got_inputs)
    got.backward(grad)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-6))
    out_error = relative(got, expected.detach())
    grad_error = max(relative(g.grad, e.grad) for g, e in zip(got_inputs, inputs))
    del reference, expected, got
    return {"out_rel_err": out_error, "grad_rel_err": grad_error, "ok": out_error < 2e-2 and grad_error < 5e-2}


def _dense_flash(device: str) -> Callable[..., torch.Tensor]:
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if device != "cuda":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attention


def _create_block_mask_reference(seq: int, heads: int, block_size: int, dense_ms: float) -> None:
    """What FlexAttention users pay to build the same local+global mask with ``create_block_mask`` (per call)."""
    from torch.nn.attention.flex_attention import create_block_mask

    window = global_window(seq, 0.25, block_size, block_size)
    mask = TokenMask((head_pattern("global", window=window, n_global=block_size),), True, block_size)
    allowed = mask.predicate("cuda")

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return allowed(0, q, k)
    times = timed(lambda: create_block_mask(mask_mod, None, None, seq, seq, device="cuda", BLOCK_SIZE=block_size),
                  "cuda", 1, 5)
    emit({"section": "kernels", "kernel": "create_block_mask (FlexAttention's own, per call)",
          "mask": "local+global 25%", "seq": seq, "ms": statistics.median(times), "dense_ms": dense_ms})


def bench_cpu(args: argparse.Namespace) -> None:
    """Block-gather vs masked SDPA (the same token mask dense) at seq 2k, 25% density, forward+backward."""
    batch, heads, head_dim, seq, block_size = (1, 2, 32, 256, 32) if args.quick else (1, 8, 64, 2048, 128)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim)
    iters = 2 if args.quick else 5
    dense = statistics.median(timed(fwd_bwd(_dense_flash("cpu"), q, k, v, grad), "cpu", 1, iters))
    emit({"section": "cpu", "kernel": "dense causal SDPA", "seq": seq, "ms": dense})
    for kernel, mask_name, factory in candidates(seq, heads, block_size):
        if kernel not in ("flash", "chunked") and not mask_name.startswith("local"):
            continue
        module = factory()
        if kernel == "flex":
            module = SparseAttention(block_size, True, None, backend="gather", head_patterns=module.head_patterns)
            kernel = "gather"
        masked = statistics.median(timed(fwd_bwd(lambda a, b, c, m=module: reference_attention(
            a, b, c, m.mask, 1 / math.sqrt(head_dim)), q, k, v, grad), "cpu", 1, iters))
        ms = statistics.median(timed(fwd_bwd(module, q, k, v, grad), "cpu", 1, iters))
        emit({"section": "cpu", "kernel": f"sas {kernel}", "mask": mask_name, "seq": seq, "ms": ms,
              "masked_sdpa_ms": masked, "speedup_vs_masked_sdpa": masked / ms, "speedup_vs_dense_causal": dense / ms})


def main() -> None:
    """Parse arguments, run the chosen sections, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", action="store_true", help="GPU: every attention-kernel candidate vs dense flash")
    parser.add_argument("--long", action="store_true", help="GPU: the 32k compiled training step, dense vs sas")
    parser.add_argument("--quality", action="store_true", help="GPU: validation loss at equal tokens at seq 8k")
    parser.add_argument("--cpu", action="store_true", help="the CPU section (block-gather vs masked SDPA)")
    parser.add_argument("--check", action="store_true", help="only check every kernel candidate against the "
                                                             "reference (exit 1 if one is off)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU (a smoke test)")
    parser.add_argument("--seqs", default="8192", help="--kernels sequence lengths, comma-separated")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per kernel configuration")
    parser.add_argument("--long-seq", type=int, default=32768, help="--long sequence length")
    parser.add_argument("--steps-timed", type=int, default=10, help="--long timed steps per configuration (≥ 10)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="--long: eager instead of compiled")
    parser.add_argument("--rows", default="dense,global,importance",
                        help="--long/--quality rows, comma-separated from dense, global (local+global), importance, "
                             "flash (importance by groups of 4 query blocks on the flash kernel)")
    parser.add_argument("--quality-seq", type=int, default=8192)
    parser.add_argument("--quality-batch", type=int, default=4)
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--quality-lr", type=float, default=2e-3)
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no new configuration after this long")
    args = parser.parse_args()
    args.seqs = [int(s) for s in args.seqs.split(",") if s]
    args.rows = tuple(r for r in args.rows.split(",") if r)
    unknown = set(args.rows) - set(ROW_KEYS)
    if unknown:
        raise SystemExit(f"bench_sas: --rows {sorted(unknown)[0]!r} is unknown; use {', '.join(ROW_KEYS)}")
    args.over_budget = lambda: time.perf_counter() - STARTED > args.budget_s
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    sections = [s for s in ("kernels", "long", "quality", "cpu") if getattr(args, s)]
    if not sections:
        sections = ["kernels", "long", "quality", "cpu"] if args.quick else (["kernels"] if device == "cuda" else ["cpu"])
    if device == "cpu" and not args.quick and set(sections) - {"cpu"}:
        raise SystemExit(f"bench_sas: --{'/--'.join(sorted(set(sections) - {'cpu'}))} need CUDA; add --quick for "
                         "the CPU smoke run")
    if args.check:
        sections = []
    torch.backends.cuda.matmul.allow_tf32 = True
    # Every (sequence, mask, kernel option) is a recompilation of flex_attention: allow them all (past the
    # default limit torch.compile silently falls back to eager, which materialises S² scores).
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    print(f"bench_sas: device={device} torch={torch.__version__} sections={','.join(sections)} quick={args.quick}",
          flush=True)
    if device == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}", flush=True)
    if args.check:
        check_candidates(device)
    for section in sections:
        if section == "kernels":
            bench_kernels(args, device)
        elif section == "long":
            long_step(args, device, emit)
        elif section == "quality":
            quality(args, device, emit)
        else:
            bench_cpu(args)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_sas.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": ROWS}, indent=1, default=str))
        print(f"wrote {path}", flush=True)
    print(f"total {time.perf_counter() - STARTED:.1f} s", flush=True)
    failed = [r for r in ROWS if r.get("section") in ("check", "kernels") and r.get("ok") is False]
    if failed:
        print(f"bench_sas: {len(failed)} kernel checks FAILED (see the check rows)", flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
