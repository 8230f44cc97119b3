"""Where bench_ort's step spends its time, node by node (ORT) and op by shape (PyTorch), on CPU.

    OMP_NUM_THREADS=2 taskset -c 2,3 python3 tools/profile_ort.py --threads 2

Exports HF GPT-2 small (batch 4, seq 256) as ``bench_ort.py`` does, then
- ORT: 5 training steps of a profiled session; per node, the milliseconds of the median of steps 3–5 (the
  first two fill ONNX Runtime's memory arena and pay its page faults); totals by op type, then the
  largest nodes with their input shapes; the wall time of each step's forward+backward and optimizer;
- PyTorch eager: 2 unprofiled steps, then one profiled step; self time by op, then by (op, input shapes).
Prints both; the figures in the README's ONNX Runtime section came from this script.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_ort(folder: Path, feeds: list, threads: int) -> None:
    """Profile 5 ORT training steps and print op-type totals and the 25 largest nodes (ms per step: the median
    of steps 3–5)."""
    from bench_ort import profile_ort_nodes

    walls, nodes = profile_ort_nodes(folder, feeds, threads)
    print(f"ORT forward+backward / optimizer ms per step: {[(round(a), round(b)) for a, b in walls]}", flush=True)
    per_step = {node: (op, shapes, sorted(times)[len(times) // 2]) for node, (op, shapes, times) in nodes.items()}
    by_op: collections.Counter = collections.Counter()
    for op, _, ms in per_step.values():
        by_op[op] += ms
    print(f"ORT op time per step {sum(by_op.values()):.0f} ms: "
          + ", ".join(f"{op} {ms:.0f}" for op, ms in by_op.most_common(30)), flush=True)
    for node, (op, shapes, ms) in sorted(per_step.items(), key=lambda kv: -kv[1][2])[:25]:
        print(f"   ORT {ms:7.1f} {op:20s} {node[:60]:60s} {shapes[:90]}")


def profile_torch(step) -> None:
    """Profile one PyTorch step (after two warm-up steps) and print self time by op and by (op, shapes)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        step()
        print(f"PyTorch profiled step: {1e3 * (time.perf_counter() - start):.0f} ms wall")
    by_op: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total / 1e3
    print(f"PyTorch self time per step {sum(by_op.values()):.0f} ms: "
          + ", ".join(f"{op} {ms:.0f}" for op, ms in by_op.most_common(30)))
    for event in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:25]:
        print(f"   PyTorch {event.self_cpu_time_total / 1e3:7.1f} x{event.count:3d} {event.key:40s} "
              f"{str(event.input_shapes)[:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads, both backends")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench_ort import build_program

    from effcompile.export.onnx import export_training_artifacts

    spec, program = build_program(12, 768, 12, 50257, 4, 256)
    with tempfile.TemporaryDirectory(prefix="profile_ort.") as tmp:
        folder = Path(tmp) / "onnx"
        export_training_artifacts(program, folder, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        print("legalisation:", json.loads((folder / "effcompile_onnx.json").read_text())["legalisation"], flush=True)
        profile_ort(folder, [f.numpy() for f in program.flat_inputs()], args.threads)
    model = spec.module
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step() -> None:
        model(*spec.args, **spec.kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    profile_torch(step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
