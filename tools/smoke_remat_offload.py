"""GPU smoke test of ``remat.offload``: gradients bit-identical on CUDA, and the overlap the side stream achieves.

1. Exactness (a 4-layer GPT-2, d256, batch 4 × 256, bf16 autocast, deterministic kernels, math attention, loss
   head kept): for ``blocks`` + ``offload=on``, ``budget 0.5`` + ``offload=auto`` with a free link (offloads
   wherever it helps) and ``budget 0.6`` + ``offload=on`` with the measured link, the loss and every gradient are
   ``torch.equal``
   to the same plan with offloading switched off and to the graph without remat; every storage the plan
   offloads is sent to host memory once per step and nothing is fetched on demand (all prefetched).
2. Overlap (skipped with ``--quick``): GPT-2 medium (24L d1024, batch 8 × 1024), ``remat blocks`` +
   ``offload=on``: median step time with offloading on and off (same segments, 10 steps each after 3 warm-up),
   the side stream's busy time (timing events) and peak memory. overlap = 1 − (extra step time ÷ copy time).

    source tools/device_env.sh && python3 tools/smoke_remat_offload.py
    python3 tools/smoke_remat_offload.py --quick      # exactness only

Exit status 1 when a gradient differs or a prefetch was missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effcompile.api import supply_host_link  # noqa: E402
from effcompile.capture import capture  # noqa: E402
from effcompile.pass_manager import PassManager, resolve_passes  # noqa: E402
from effcompile.passes.remat import OffloadedSpan, RematPlan  # noqa: E402
from effcompile.passes.remat.offload import CudaLink  # noqa: E402
from effcompile.program import Program  # noqa: E402
from effcompile.spec import load_hf_spec  # noqa: E402

SMALL = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0)
MEDIUM = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50304, n_positions=1024, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0)


def captured(config: dict, batch: int, seq: int) -> Program:
    """HF GPT-2 captured on the GPU (random weights, seed 0)."""
    spec = load_hf_spec("gpt2", config, batch=batch, seq=seq)
    spec.module.to("cuda")
    spec.kwargs = {k: v.to("cuda") for k, v in spec.kwargs.items()}
    return capture(spec, "export")


def rematerialised(program: Program, options: dict) -> Program:
    """``remat`` with ``options`` (planned for bf16 autocast) on a copy of ``program``."""
    passes = resolve_passes(["remat"], {"remat": {**options, "autocast": "bfloat16"}})
    program = program.clone()
    supply_host_link(program)  # the measured (or cached) link, as effcompile.compile hands it to remat
    result = PassManager(passes, verify=False, measure=False).run(program)
    if not result.records[0].changed:
        raise SystemExit(f"remat changed nothing for {options}: {result.records[0].reason}")
    return result.program


def spans(module: torch.nn.Module) -> list[OffloadedSpan]:
    return [m for m in module.modules() if isinstance(m, OffloadedSpan)]


def gradients(program: Program) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one bf16-autocast step (fixed seed)."""
    program.gm.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = program.run().loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach().clone(), {n: p.grad.clone() for n, p in program.gm.named_parameters() if p.grad is not None}


def identical(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


def check_exactness() -> bool:
    """Part 1; prints one line per plan and returns True when every check held."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    ok = True
    with sdpa_kernel(SDPBackend.MATH):
        base = captured(SMALL, 4, 256)
        reference = gradients(base)
        # The loss head is kept (a chunked head equals the plain one to round-off, not bit for bit).
        for options in ({"policy": "blocks", "offload": "on", "head": "keep", "offload_min_bytes": 0},
                        {"budget": 0.5, "offload": "auto", "link_bandwidth": 1e15, "offload_min_bytes": 0,
                         "head": "keep"},
                        {"budget": 0.6, "offload": "on", "offload_min_bytes": 0, "head": "keep"}):
            program = rematerialised(base, options)
            plan = program.plan(RematPlan)
            links = {}
            for span in spans(program.gm):
                links[span] = CudaLink(torch.device("cuda"))
                span.use_link(links[span])
            with_offload = gradients(program)
            for span in spans(program.gm):
                span.set_offloading(False)
            without = gradients(program)
            moved = sum(link.bytes.get("mark", 0) for link in links.values())
            fetched = sum(link.counts.get("fetch", 0) for link in links.values())
            same = identical(with_offload, without) and identical(with_offload, reference)
            planned = plan.offloaded_bytes if plan else 0
            good = same and moved == planned and fetched == 0 and planned > 0
            ok &= good
            print(f"{'OK ' if good else 'BAD'} {options}: gradients bit-identical to offloading off and to no remat: "
                  f"{same}; offloaded {moved / 2**20:.2f} MiB (plan {planned / 2**20:.2f} MiB, "
                  f"{len(plan.offloaded) if plan else 0} tensors); on-demand fetches {fetched}", flush=True)
    torch.use_deterministic_algorithms(False)
    return ok


def timed(program: Program, optimizer: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    """Median ms per step over ``steps`` steps and peak GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = program.run().loss
        loss.backward()
        optimizer.step()
        float(loss)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def measure_overlap() -> None:
    """Part 2: GPT-2 medium, remat blocks + offload, offloading on vs off."""
    torch.backends.cuda.matmul.allow_tf32 = True
    base = captured(MEDIUM, 8, 1024)
    program = rematerialised(base, {"policy": "blocks", "offload": "on"})
    del base
    plan = program.plan(RematPlan)
    link = CudaLink(torch.device("cuda"), timing=True)
    for span in spans(program.gm):
        span.use_link(link)
    optimizer = torch.optim.AdamW(program.gm.parameters(), lr=1e-4, fused=True)
    timed(program, optimizer, 3)
    link.copy_seconds()
    link.counts.clear()
    on_ms, on_peak = timed(program, optimizer, 10)
    copy_ms = 1000 * link.copy_seconds() / 10
    fetches = link.counts.get("fetch", 0) / 10
    for span in spans(program.gm):
        span.set_offloading(False)
    timed(program, optimizer, 3)
    off_ms, off_peak = timed(program, optimizer, 10)
    hidden = 1.0 - max(0.0, on_ms - off_ms) / copy_ms if copy_ms > 0 else 0.0
    print(f"overlap: {plan.offloaded_bytes / 2**20:.0f} MiB offloaded per step ({len(plan.offloaded)} tensors, link "
          f"{plan.link_bytes_per_second / 1e9:.1f} GB/s {plan.link_source}, time scale {plan.time_scale:.2f} "
          f"{plan.time_scale_source}); copies busy {copy_ms:.1f} ms per step (both ways); step {on_ms:.1f} ms with "
          f"offload vs {off_ms:.1f} ms without (+{on_ms - off_ms:.1f} ms); peak {on_peak:.2f} vs {off_peak:.2f} GiB; "
          f"overlap achieved {100 * max(0.0, min(1.0, hidden)):.0f}% of copy time hidden; on-demand fetches per step "
          f"{fetches:.1f}; predicted exposed {1000 * plan.predicted_exposed_copy_seconds:.2f} ms", flush=True)


def main() -> None:
    """Run part 1 (and part 2 unless ``--quick``); exit 1 when an exactness check fails."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="exactness only (small model)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("smoke_remat_offload.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok = check_exactness()
    if not args.quick:
        measure_overlap()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
