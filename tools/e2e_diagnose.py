"""``bench_e2e.py --diagnose``: why compiling the Hugging Face Llama loses at long sequences, settled in one run.

For the workload's model at a small size (``--diagnose-seq`` × ``--diagnose-batch``), one training step
(forward, backward, fused AdamW, bf16) of each variant is timed (median of 10 after 3 warm-ups) and profiled
once; the profile says which SDPA backend ran — the ATen op (``_scaled_dot_product_flash_attention``,
``_efficient_attention``, ``_cudnn_attention``, ``_math``) and the attention kernels by name — and whether a
mask was materialised (the mask-building ops' time):

  hf_eager          HF eager under autocast: transformers skips the mask, SDPA runs is_causal (flash)
  hf_compile        torch.compile(HF): under dynamo transformers (torch < 2.14) materialises the causal mask,
                    and SDPA with an explicit mask cannot use flash (the suspect)
  hf_compile_nomask torch.compile(HF) with transformers' "can the causal mask be skipped" check forced to yes
                    when nothing is padded — if this one is fast, the mask was the cause
  ours_eager        effcompile capture + amp (the capture canonicalises the mask to is_causal=True), eager
  ours_compile      the same graph under torch.compile
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
            "_flash_attention_forward", "_efficient_attention_forward")
ATTENTION_WORDS = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn", "mem_eff")


@contextlib.contextmanager
def causal_mask_skipped():
    """transformers' ``_ignore_causal_mask_sdpa`` answering yes when nothing is padded, even under dynamo."""
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa

    def skip(*args: Any, **kwargs: Any) -> bool:
        padding_mask = args[0] if args else kwargs.get("padding_mask")
        lengths = list(args[1:3]) if len(args) >= 3 else [v for k, v in kwargs.items() if k.endswith("length")]
        return padding_mask is None and len(lengths) == 2 and (lengths[0] == 1 or lengths[0] == lengths[1])

    masking_utils._ignore_causal_mask_sdpa = skip
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


def profile_step(step: Any) -> dict[str, Any]:
    """Run ``step`` once under the profiler: SDPA ATen ops by name, attention kernels by total CUDA ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ops: Counter = Counter()
    kernels: Counter = Counter()
    for event in prof.key_averages():
        name = event.key
        if any(op in name for op in SDPA_OPS):
            ops[name] += event.count
        device_ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1e3
        if device_ms and any(w in name.lower() for w in ATTENTION_WORDS) and not name.startswith("aten::"):
            kernels[name[:90]] += device_ms
    return {"sdpa_ops": dict(ops), "attention_kernels_ms": {k: round(v, 2) for k, v in kernels.most_common(6)}}


def time_variant(module: torch.nn.Module, runner: Any, inputs: dict[str, torch.Tensor], autocast: bool) -> dict[str, Any]:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            loss = runner(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(10):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    found = profile_step(step)
    return {"ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "max_ms": round(max(times), 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "warmup_s": round(warm, 1), **found}


def diagnose(setup: Any, seq: int, batch: int, out: Path) -> int:
    """Run every variant, print a table and write ``bench_e2e_diagnose.json``; returns 0."""
    from bench_e2e import llama

    import effcompile
    from effcompile.spec import ModelSpec

    setup.seq, setup.batch = seq, batch
    device = torch.device("cuda")
    ids = torch.randint(0, 256, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    rows: dict[str, Any] = {}
    variants = ("hf_eager", "hf_compile", "hf_compile_nomask", "ours_eager", "ours_compile")
    print(f"{torch.__version__} {torch.cuda.get_device_name()} seq {seq} × batch {batch}", flush=True)
    for name in variants:
        try:
            rows[name] = _variant(name, setup, device, inputs, effcompile, ModelSpec, llama)
        except Exception as error:  # record and go on: the point is the comparison
            rows[name] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
        print(f"{name:18s} {json.dumps(rows[name])}", flush=True)
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_e2e_diagnose.json").write_text(json.dumps({"seq": seq, "batch": batch, "rows": rows}, indent=1))
    return 0


def _variant(name: str, setup: Any, device: torch.device, inputs: dict[str, torch.Tensor], effcompile: Any,
             spec_class: Any, llama: Any) -> dict[str, Any]:
    model = llama(setup, device)
    if name.startswith("hf"):
        runner = torch.compile(model) if "compile" in name else model
        context = causal_mask_skipped() if name.endswith("nomask") else contextlib.nullcontext()
        with context:
            return time_variant(model, runner, inputs, autocast=True)
    result = effcompile.compile(spec_class(model, (), dict(inputs), None, "llama"), passes=["amp"],
                                capture_path="export", dynamic_batch=False, verify=False, measure=False)
    module = result.module
    runner = torch.compile(module) if name.endswith("compile") else module
    return time_variant(module, runner, inputs, autocast=False)
