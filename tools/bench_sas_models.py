"""Model-level benchmarks of ``sas`` for ``tools/bench_sas.py``: the long-context training step and the
quality run (a Llama-style model: RMSNorm, RoPE, SwiGLU, SDPA causal attention, byte vocabulary).

``long_step``: one training step (forward, backward, fused AdamW, bf16 autocast, ``torch.compile``) at seq 32k,
batch 1, of a 12-layer d768 model: dense flash against ``sas`` local+global and importance at 25% of the
causal tiles; median and spread of ≥ 10 steps, all rows in one run.
``quality``: validation loss at equal tokens on the bundled byte corpus (``load_corpus("stdlib")``) at seq 8k:
dense against local+global and importance (dense warm-up passes, then the tiles scored on them).
"""

from __future__ import annotations

import math
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Emit = Callable[[dict[str, Any]], None]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_1, self.norm_2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
        self.gate, self.up = nn.Linear(width, ff, bias=False), nn.Linear(width, ff, bias=False)
        self.down = nn.Linear(ff, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm_1(x)).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attention.transpose(1, 2).reshape(batch, seq, width))
        hidden = self.norm_2(x)
        return x + self.down(F.silu(self.gate(hidden)) * self.up(hidden))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaStyle(nn.Module):
    """Llama-style decoder: ``layers`` blocks of width ``width``, ``heads`` heads, SwiGLU ``ff``, byte vocabulary."""

    def __init__(self, layers: int, width: int, heads: int, ff: int, context: int, vocab: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width, heads, ff) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(width), nn.Linear(width, vocab, bias=False)
        head_dim = width // heads
        inverse = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(context).float(), inverse)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def next_byte_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each next byte (float32)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def global_window(seq: int, density: float, n_global: int, block_size: int) -> int:
    """The local window (tokens) whose causal ``global`` pattern (``n_global`` tokens + window) computes the tile
    density closest to ``density`` at ``seq`` tokens."""
    from effcompile.passes.sas.patterns import TokenMask, head_pattern

    def tiles(window: int) -> float:
        return TokenMask((head_pattern("global", window=window, n_global=n_global),), True, block_size).stats(
            seq, seq).tile_density

    low, high = 1, seq
    while low < high:
        middle = (low + high) // 2
        if tiles(middle) < density:
            low = middle + 1
        else:
            high = middle
    return low if abs(tiles(low) - density) <= abs(tiles(max(low - 1, 1)) - density) else max(low - 1, 1)


ROW_KEYS = ("dense", "global", "importance", "flash")


def sas_configs(seq: int, block_size: int, n_global: int, density: float, rows: tuple[str, ...],
                warmup: int = 0) -> list[tuple[str, dict[str, Any] | None]]:
    """(row name, sas options or None for dense) of the long and quality runs, for the ``rows`` asked
    (``ROW_KEYS``: dense, local+global, importance, importance by groups of 4 on the flash kernel)."""
    window = global_window(seq, density, n_global, block_size)
    importance: dict[str, Any] = {"pattern": "importance", "density": density, "block_size": block_size,
                                  "calib_steps": 1}
    if warmup:
        importance["warmup"] = warmup
    configs = {
        "dense": ("dense", None),
        "global": (f"sas local+global {density:.0%} (window {window}, {n_global} global)",
                   {"pattern": "global", "window": window, "n_global": n_global, "block_size": block_size}),
        "importance": (f"sas importance {density:.0%}", importance),
        "flash": (f"sas importance {density:.0%} groups of 4 (flash kernel)",
                  {**importance, "group": 4, "backend": "flash"}),
    }
    return [configs[key] for key in ROW_KEYS if key in rows]


def timed_steps(step: Callable[[], None], device: str, warmup: int, steps: int) -> list[float]:
    """Milliseconds of ``steps`` calls of ``step()`` after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _model_for(base: nn.Module, shape: tuple[int, ...], device: str, options: dict[str, Any] | None,
               example: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``base`` (same weights), made sparse by ``sas`` with ``options`` (None: dense)."""
    model = LlamaStyle(*shape).to(device)
    model.load_state_dict(base.state_dict())
    return (model, {}) if options is None else _sparsify(model, example, options)


def _sparsify(model: nn.Module, idx: torch.Tensor, options: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import effcompile

    result = effcompile.compile(model, (idx,), passes=["sas"], options={"sas": options}, loss_fn=next_byte_loss,
                                verify=False, measure=False)
    record = result.report.records[0]
    if not record.changed:
        raise RuntimeError(f"sas did not rewrite: {record.reason}")
    keys = ("token_density", "tile_density", "mask_build_ms", "attention_ms")
    info = {k: record.stats.get(k) for k in keys}
    info["backend"] = ",".join(sorted({s["backend"] for s in record.details["sites"]}))
    return result.module, info


def _train_steps(module: nn.Module, idx: torch.Tensor, device: str, compiled: bool, warmup: int,
                 steps: int) -> list[float]:
    """Milliseconds of ``steps`` training steps (forward, backward, fused AdamW; bf16 autocast on CUDA)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device == "cuda")
    runner = torch.compile(module) if compiled else module

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = next_byte_loss(runner(idx), idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timed_steps(step, device, warmup, steps)


def long_step(args: Any, device: str, emit: Emit) -> None:
    """One compiled training step at seq ``args.long_seq`` (32k), batch 1: dense flash vs sas, ≥ 10 steps each."""
    layers, width, heads, ff, seq = (2, 64, 2, 128, 512) if args.quick else (12, 768, 12, 2048, args.long_seq)
    block_size = 64 if args.quick else 128
    steps = 3 if args.quick else max(10, args.steps_timed)
    torch.manual_seed(0)
    base = LlamaStyle(layers, width, heads, ff, seq).to(device)
    idx = torch.randint(0, 256, (1, seq), device=device)
    dense_ms = None
    configs = sas_configs(seq, block_size, 64 if args.quick else 128, 0.25, args.rows)
    for name, options in configs:
        if args.over_budget():
            emit({"section": "long", "config": name, "skipped": "time budget"})
            continue
        try:
            module, info = _model_for(base, (layers, width, heads, ff, seq), device, options, idx)
            times = _train_steps(module, idx, device, bool(args.compile and device == "cuda"),
                                 1 if args.quick else 4, steps)
            median = statistics.median(times)
            dense_ms = median if options is None else dense_ms
            row = {"section": "long", "config": name, "seq": seq, "layers": layers, "width": width,
                   "compiled": bool(args.compile and device == "cuda"), "ms_median": median,
                   "ms_min": min(times), "ms_max": max(times), "steps": len(times), **info}
            if options is not None and dense_ms:
                row["speedup_vs_dense"] = dense_ms / median
            if device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            emit(row)
        except Exception as error:  # one configuration failing must not stop the others
            emit({"section": "long", "config": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            traceback.print_exc(limit=4)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def _lr(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def quality(args: Any, device: str, emit: Emit) -> None:
    """Validation loss at equal tokens at seq ``args.quality_seq``: dense vs local+global vs importance."""
    from effcompile.train.data import Batches, load_corpus

    layers, width, heads, ff = (2, 64, 2, 128) if args.quick else (6, 512, 8, 1408)
    seq = 256 if args.quick else args.quality_seq
    batch, steps = (2, 6) if args.quick else (args.quality_batch, args.quality_steps)
    block_size = 32 if args.quick else 128
    corpus = load_corpus("stdlib", max_bytes=2_000_000 if args.quick else None)
    train, validation = Batches(corpus.train, batch, seq, seed=1), Batches(corpus.validation, batch, seq, seed=2)
    val_batches = [b.to(device) for b in validation.fixed(2 if args.quick else 8)]
    warmup = max(1, int(0.3 * steps))
    torch.manual_seed(0)
    base = LlamaStyle(layers, width, heads, ff, seq).to(device)
    dense_loss = None
    for name, options in sas_configs(seq, block_size, 32 if args.quick else 128, 0.25, args.rows, warmup=warmup):
        if args.over_budget():
            emit({"section": "quality", "config": name, "skipped": "time budget"})
            continue
        try:
            module, info = _model_for(base, (layers, width, heads, ff, seq), device, options,
                                      train.batch(10**6).to(device))
            optimizer = torch.optim.AdamW(module.parameters(), lr=args.quality_lr, weight_decay=0.1,
                                          fused=device == "cuda")
            started, times = time.perf_counter(), []
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = _lr(step, steps, args.quality_lr)
                tokens = train.batch(step).to(device)
                start = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    loss = next_byte_loss(module(tokens), tokens)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1000)
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                val = statistics.fmean(float(next_byte_loss(module(b), b)) for b in val_batches)
            dense_loss = val if options is None else dense_loss
            row = {"section": "quality", "config": name, "seq": seq, "batch": batch, "steps": steps,
                   "tokens": steps * batch * seq, "val_loss": val, "train_loss_last": float(loss),
                   "ms_per_step_median": statistics.median(times[warmup:] or times),
                   "seconds": time.perf_counter() - started, **info}
            if options is not None and dense_loss:
                row["val_vs_dense_pct"] = 100 * (val - dense_loss) / dense_loss
                if options.get("warmup"):
                    row["warmup_passes"] = options["warmup"]
            emit(row)
        except Exception as error:
            emit({"section": "quality", "config": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            traceback.print_exc(limit=4)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
