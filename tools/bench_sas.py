"""Benchmark the ``sas`` pass's block-sparse attention against dense attention, in the same run.

GPU (``--device cuda``): one attention forward+backward, bf16, batch 4, 16 heads, head dim 64, causal, at
seq 4k/8k/16k and densities 100/50/25/12.5% of the causal tiles (a local window and an importance-style
random mask), FlexAttention with our BlockMask (tiles of 128 and 256) against dense causal SDPA (flash);
then one training step of a 12-layer GPT (d768, 12 heads) at seq 8k, dense against ``sas``.
CPU (``--device cpu``): the block-gather kernel against SDPA with the same mask as a dense boolean mask
(and dense causal SDPA for scale) at seq 2k, 25% density. ``--quick``: tiny shapes, runs anywhere.

Prints one row per configuration as soon as it is measured; with ``OUT`` set, writes
``$OUT/bench_sas.json``. A failing configuration prints its error and the run goes on.
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effcompile.passes.sas.kernels import (  # noqa: E402
    build_block_mask,
    chunked_attention,
    flex_sparse_attention,
    gather_attention,
    reference_attention,
)
from effcompile.passes.sas.patterns import fixed_pattern, select_important_tiles, tile_density  # noqa: E402

ROWS: list[dict[str, Any]] = []
STARTED = time.perf_counter()


def emit(row: dict[str, Any]) -> None:
    """Print one result row (flushed) and keep it for the JSON file."""
    ROWS.append(row)
    cells = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
    print(" | ".join(cells), flush=True)


def timed(function: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of ``function()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start_time = time.perf_counter()
        function()
        times.append((time.perf_counter() - start_time) * 1000)
    return statistics.median(times)


def local_tiles(blocks: int, density: float, block_size: int) -> torch.Tensor:
    """A causal local-window tile mask ``[1, blocks, blocks]`` whose density is closest to ``density``."""
    best = None
    for window in range(1, blocks + 1):
        tiles = fixed_pattern("local", blocks, blocks, block_size, True, window=window * block_size,
                              block=block_size, stride=block_size, n_global=0)[None]
        gap = abs(tile_density(tiles, True) - density)
        if best is None or gap < best[0]:
            best = (gap, tiles)
    assert best is not None
    return best[1]


def local_window(blocks: int, density: float, block_size: int) -> int:
    """The local window (tokens) whose causal tile density is closest to ``density``."""
    tiles = local_tiles(blocks, density, block_size)
    return int(tiles[0, -1].sum()) * block_size


def random_tiles(heads: int, blocks: int, density: float, seed: int = 0) -> torch.Tensor:
    """An importance-style mask: per head, the diagonal plus random causal tiles, exactly ``density``."""
    scores = torch.rand(heads, blocks, blocks, generator=torch.Generator().manual_seed(seed))
    return select_important_tiles(scores, True, density)


def fwd_bwd(attention: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            grad: torch.Tensor) -> Callable[[], None]:
    """A closure running attention forward and backward once."""
    def step() -> None:
        q.grad = k.grad = v.grad = None
        attention(q, k, v).backward(grad)
    return step


def over_budget(budget_s: float) -> bool:
    """Whether the run has used its time budget (the remaining rows are then skipped)."""
    return time.perf_counter() - STARTED > budget_s


def bench_gpu_attention(args: argparse.Namespace, seqs: list[int], variants: bool, budget_s: float) -> None:
    """Flex block-sparse vs dense flash SDPA, forward+backward, bf16, at ``seqs``; with ``variants`` also
    flex kernel-option variants at 8k."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = "cuda", torch.bfloat16
    batch, heads, head_dim = (1, 2, 64) if args.quick else (4, 16, 64)
    seqs = [256] if args.quick else seqs
    densities = [1.0, 0.25] if args.quick else [1.0, 0.5, 0.25, 0.125]
    # Most informative first (8k, 25%), so a cut-short run still answers the goal.
    plan: list[tuple[int, int, str, float, dict | None]] = []
    for seq in seqs:
        for density in densities:
            if density < 1.0:
                plan.append((seq, 128 if not args.quick else 64, "block", density, None))
        for block_size in ((128,) if args.quick else (128, 256)):
            for pattern in ("local", "random"):
                for density in densities:
                    if block_size == 256 and density in (1.0, 0.5):
                        continue
                    plan.append((seq, block_size, pattern, density, None))
    if variants and not args.quick:
        plan.append((8192, 128, "random", 0.25, {"BLOCK_M": 128, "BLOCK_N": 128}))
        plan.append((8192, 256, "random", 0.25, {"BLOCK_M": 128, "BLOCK_N": 128}))
    # Kernel-option variants last: each is one more compilation.
    plan.sort(key=lambda p: (p[0] != 8192, p[4] is not None, p[3] != 0.25, p[0], p[1], p[2], -p[3]))
    dense_ms: dict[int, float] = {}
    for seq, block_size, pattern, density, kernel_options in plan:
        if over_budget(budget_s):
            emit({"section": "attention", "seq": seq, "tile": block_size, "pattern": pattern, "density": density,
                  "skipped": "time budget"})
            continue
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
        try:
            if seq not in dense_ms:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    dense_ms[seq] = timed(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(
                        a, b, c, is_causal=True), q, k, v, grad), device, 3, args.iters)
                emit({"section": "attention", "kernel": "dense causal SDPA (flash)", "seq": seq, "ms": dense_ms[seq]})
            blocks = math.ceil(seq / block_size)
            if pattern == "block":  # block-diagonal: the chunked kernel (dense flash SDPA over chunks)
                chunk = int(seq * density)
                tiles = fixed_pattern("block", blocks, blocks, block_size, True, window=block_size, block=chunk,
                                      stride=block_size, n_global=0)[None]
                chunked = functools.partial(chunked_attention, chunk=chunk, causal=True, scale=1 / math.sqrt(head_dim))
                ms = timed(fwd_bwd(chunked, q, k, v, grad), device, 3, args.iters)
                emit({"section": "attention", "kernel": "sas chunked (flash)", "seq": seq, "tile": block_size,
                      "pattern": f"block {chunk}", "density": round(tile_density(tiles, True), 4), "ms": ms,
                      "dense_ms": dense_ms[seq], "speedup": dense_ms[seq] / ms})
                continue
            tiles = local_tiles(blocks, density, block_size) if pattern == "local" else \
                random_tiles(heads, blocks, density)
            tiles = tiles.expand(heads, blocks, blocks).contiguous().to(device)
            block_mask = build_block_mask(tiles, block_size, True, seq, seq)
            scale = 1.0 / math.sqrt(head_dim)
            sparse = functools.partial(flex_sparse_attention, block_mask=block_mask, scale=scale,
                                       kernel_options=kernel_options)
            ms = timed(fwd_bwd(sparse, q, k, v, grad), device, 3, args.iters)
            emit({"section": "attention", "kernel": "sas flex", "seq": seq, "tile": block_size, "pattern": pattern,
                  "density": round(tile_density(tiles.cpu(), True), 4), "kernel_options": str(kernel_options or ""),
                  "ms": ms, "dense_ms": dense_ms[seq], "speedup": dense_ms[seq] / ms})
        except Exception as error:  # one configuration failing must not stop the others
            emit({"section": "attention", "seq": seq, "tile": block_size, "pattern": pattern, "density": density,
                  "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"})
            traceback.print_exc(limit=2)
        finally:
            del q, k, v, grad
            torch.cuda.empty_cache()


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, seq, width))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class BenchGPT(nn.Module):
    """A GPT-2-small-shaped model (pre-LN, SDPA causal attention) that symbolic tracing follows."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int, context: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.ones_like(idx[0]).cumsum(0) - 1
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _train_step(module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor],
                idx: torch.Tensor, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = loss_fn(module(idx), idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_end_to_end(args: argparse.Namespace, device: str, budget_s: float) -> None:
    """One training step (forward, backward, AdamW) under bf16 autocast: dense model vs ``sas``."""
    import effcompile

    layers, width, heads, vocab, seq, batch = (2, 64, 2, 128, 256, 2) if args.quick else (12, 768, 12, 50304, 8192, 1)
    block_size = 64 if args.quick else 128
    torch.manual_seed(0)
    model = BenchGPT(layers, width, heads, vocab, seq).to(device)
    idx = torch.randint(0, vocab, (batch, seq), device=device)

    def loss_fn(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    results: dict[str, float] = {}
    block_options = {"pattern": "block", "block_size": block_size, "block": seq // 4, "backend": "auto"}
    configs: list[tuple[str, dict[str, Any] | None, bool]] = [
        ("dense", None, False),
        ("sas block 25%", block_options, False),
        ("sas local 25%", {"pattern": "local", "block_size": block_size, "backend": "auto",
                           "window": local_window(math.ceil(seq / block_size), 0.25, block_size)}, False),
    ]
    if args.compile_e2e:  # torch.compile removes eager's launch overhead and fuses what is not attention
        configs += [("dense compiled", None, True), ("sas block 25% compiled", block_options, True)]
    for name, options, compiled in configs:
        if over_budget(budget_s):
            emit({"section": "end-to-end", "config": name, "skipped": "time budget"})
            continue
        try:
            if options is None:
                module: nn.Module = model
            else:
                result = effcompile.compile(model, (idx,), passes=["sas"], options={"sas": options},
                                            loss_fn=loss_fn, verify=False, measure=False)
                module = result.module
                density = result.report.records[0].stats.get("density")
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device == "cuda")
            runner = torch.compile(module) if compiled else module
            step = functools.partial(_train_step, runner, optimizer, loss_fn, idx, device)
            results[name] = timed(step, device, (2 if args.quick else 3) + (2 if compiled else 0),
                                  3 if args.quick else 5)
            if args.profile:
                profile_step(step, device, name)
            row: dict[str, Any] = {"section": "end-to-end", "config": name, "layers": layers, "width": width,
                                   "seq": seq, "batch": batch, "ms_per_step": results[name]}
            reference = "dense compiled" if compiled else "dense"
            if options is not None:
                row.update(density=density, speedup=results[reference] / results[name] if reference in results
                           else None)
            emit(row)
        except Exception as error:
            emit({"section": "end-to-end", "config": name,
                  "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"})
            traceback.print_exc(limit=3)


def profile_step(step: Callable[[], None], device: str, name: str, rows: int = 15) -> None:
    """Print where one training step spends its device time (torch.profiler, top ``rows`` ops)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(f"--- profile: {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60),
          flush=True)


def bench_cpu(args: argparse.Namespace) -> None:
    """Block-gather vs masked SDPA (same tiles as a dense boolean mask) at seq 2k, 25% density, fwd+bwd."""
    batch, heads, head_dim, seq, block_size = (1, 2, 32, 256, 32) if args.quick else (1, 8, 64, 2048, 128)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim)
    blocks = seq // block_size
    scale = 1.0 / math.sqrt(head_dim)
    iters = 2 if args.quick else 3
    dense = timed(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, grad),
                  "cpu", 1, iters)
    emit({"section": "cpu", "kernel": "dense causal SDPA", "seq": seq, "ms": dense})
    for pattern in ("random", "local"):
        tiles = random_tiles(heads, blocks, 0.25) if pattern == "random" else local_tiles(blocks, 0.25, block_size)
        density = tile_density(tiles, True)
        kernel_args = dict(tile_mask=tiles, block_size=block_size, causal=True, scale=scale)
        masked = timed(fwd_bwd(functools.partial(reference_attention, **kernel_args), q, k, v, grad), "cpu", 1, iters)
        gathered = timed(fwd_bwd(functools.partial(gather_attention, **kernel_args), q, k, v, grad), "cpu", 1, iters)
        emit({"section": "cpu", "kernel": "sas gather", "pattern": pattern, "seq": seq, "tile": block_size,
              "density": round(density, 4), "ms": gathered, "masked_sdpa_ms": masked,
              "speedup_vs_masked_sdpa": masked / gathered, "speedup_vs_dense_causal": dense / gathered})
    chunk = seq // 4
    tiles = fixed_pattern("block", blocks, blocks, block_size, True, window=block_size, block=chunk,
                          stride=block_size, n_global=0)[None]
    kernel_args = dict(tile_mask=tiles, block_size=block_size, causal=True, scale=scale)
    masked = timed(fwd_bwd(functools.partial(reference_attention, **kernel_args), q, k, v, grad), "cpu", 1, iters)
    chunked = timed(fwd_bwd(functools.partial(chunked_attention, chunk=chunk, causal=True, scale=scale), q, k, v, grad),
                    "cpu", 1, iters)
    emit({"section": "cpu", "kernel": "sas chunked", "pattern": f"block {chunk}", "seq": seq, "tile": block_size,
          "density": round(tile_density(tiles, True), 4), "ms": chunked, "masked_sdpa_ms": masked,
          "speedup_vs_masked_sdpa": masked / chunked, "speedup_vs_dense_causal": dense / chunked})


def main() -> None:
    """Parse arguments, run the sections for the device, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--cpu", action="store_true", help="run the CPU section (same as --device cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test that runs on CPU)")
    parser.add_argument("--seqs", default="4096,8192,16384", help="GPU sequence lengths, comma-separated")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per GPU configuration")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="start no new configuration after this many seconds (keeps the run under 4 minutes)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end training step")
    parser.add_argument("--e2e-only", action="store_true", help="GPU: only the end-to-end training step")
    parser.add_argument("--profile", action="store_true", help="print a profile of each end-to-end step")
    parser.add_argument("--compile-e2e", action="store_true", help="also the end-to-end step under torch.compile")
    args = parser.parse_args()
    args.seqs = [int(s) for s in args.seqs.split(",") if s]
    device = "cpu" if args.cpu else args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    # Every (sequence, tile size, kernel options) is a recompilation of flex_attention: allow them all
    # (past the default limit torch.compile silently falls back to eager, which materialises S² scores).
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    print(f"bench_sas: device={device} torch={torch.__version__} quick={args.quick}", flush=True)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_sas: --device cuda but CUDA is not available")
        print(f"gpu: {torch.cuda.get_device_name()}", flush=True)
        # 8k first (the goal's length), then the end-to-end step, then the other lengths while time remains.
        first = [s for s in args.seqs if s == 8192] or args.seqs[:1]
        if not args.e2e_only:
            bench_gpu_attention(args, first, variants=True, budget_s=0.5 * args.budget_s)
        if not args.skip_e2e:
            bench_end_to_end(args, device, budget_s=0.75 * args.budget_s)
        if not args.e2e_only:
            bench_gpu_attention(args, [s for s in args.seqs if s not in first], variants=False, budget_s=args.budget_s)
    else:
        bench_cpu(args)
        if not args.skip_e2e and args.quick:
            bench_end_to_end(args, device, budget_s=args.budget_s)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_sas.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": ROWS}, indent=1))
        print(f"wrote {path}", flush=True)
    print(f"total {time.perf_counter() - STARTED:.1f} s", flush=True)


if __name__ == "__main__":
    main()
