"""ONNX Runtime training vs PyTorch eager: step time of the same model, same AdamW, same batch (CPU).

    python3 tools/bench_ort.py                 # HF GPT-2 small (12 layers, d768), batch 4, seq 256
    python3 tools/bench_ort.py --quick         # a 2-layer d64 GPT-2, seconds

Both sides start from the same weights and take the same batch; their losses are printed so the two runs
can be seen to train the same model. Steps alternate between the backends (shared machines: load hits both
alike) and the median is quoted. Prints one row per backend, then the ratio ORT / PyTorch (goal ≤ 1.0). Writes ``$OUT/bench_ort.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_program(layers: int, width: int, heads: int, vocab: int, batch: int, seq: int):
    """Capture HF GPT-2 of the given size (dropout 0) with effcompile, no passes."""
    import effcompile
    from effcompile.spec import load_hf_spec

    overrides = dict(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max(seq, 64),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    spec = load_hf_spec("gpt2", overrides, batch=batch, seq=seq)
    result = effcompile.compile(spec, verify=False, measure=False)
    return spec, result.program


def time_interleaved(steps: dict, warmup: int, measured: int) -> dict[str, tuple[float, list[float], list[float]]]:
    """Run each backend's ``step()`` in turn, ``warmup`` then ``measured`` rounds, alternating backends every
    step so that load from other processes hits both alike. Returns {name: (median ms/step, losses, the
    measured steps' ms)}."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + measured):
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name].append(step())
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(times[name]), losses[name], times[name]) for name in steps}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``--quick``: a tiny GPT-2, an end-to-end check)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 (2 layers, d64): an end-to-end check")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per backend")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured steps per backend first (ORT's memory arena reaches its size in two)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both backends")
    parser.add_argument("--no-speed-rewrites", action="store_true",
                        help="export without the GELU / cross-entropy rewrites and NaN-guard removal (to measure what they bring)")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (onnxruntime-training-cpu)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile one step of each backend and print where the time goes, by op")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.heads, args.vocab, args.seq, args.batch = 2, 64, 4, 128, 32, 2
        args.steps, args.warmup = 5, 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Time PyTorch eager against ONNX Runtime training (see the module docstring); rows to $OUT/bench_ort.json."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lr, betas, eps, weight_decay = 1e-4, (0.9, 0.999), 1e-8, 0.0
    config = f"GPT-2 L{args.layers} d{args.width} B{args.batch} S{args.seq}"
    if args.no_speed_rewrites:
        config += " (no speed rewrites)"
    print(f"torch {torch.__version__}, threads {args.threads}, {config}, AdamW lr {lr}", flush=True)
    rows: list[dict] = []
    folder = Path(tempfile.mkdtemp(prefix="bench_ort."))
    try:
        start = time.perf_counter()
        spec, program = build_program(args.layers, args.width, args.heads, args.vocab, args.batch, args.seq)
        capture_s = time.perf_counter() - start
        from effcompile.export.onnx import export_training_artifacts
        from effcompile.train.ort import OrtTrainer

        start = time.perf_counter()
        export_training_artifacts(program, folder / "onnx", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                  speed_rewrites=not args.no_speed_rewrites)
        export_s = time.perf_counter() - start
        print(f"capture {capture_s:.1f} s, export + generate_artifacts {export_s:.1f} s", flush=True)
        feeds = program.flat_inputs()
        model = spec.module  # the original HF module: PyTorch eager as users run it
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

        def torch_step() -> float:
            loss = model(*spec.args, **spec.kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        trainer = OrtTrainer(folder / "onnx", threads=args.threads)

        def ort_step() -> float:
            return trainer.step(feeds)

        backends = {"PyTorch eager": torch_step, "ONNX Runtime training": ort_step}
        try:
            results = time_interleaved(backends, args.warmup, args.steps)
        except Exception as error:  # a failing backend: measure the other alone so its figure still shows
            print(f"interleaved run FAILED {type(error).__name__}: {error}; timing each alone", flush=True)
            traceback.print_exc()
            results = {}
            for name, step in backends.items():
                try:
                    results.update(time_interleaved({name: step}, args.warmup, args.steps))
                except Exception as single:
                    print(f"{name:24s} {config}: FAILED {type(single).__name__}: {single}", flush=True)
        rows += result_rows(results, config, args.batch * args.seq)
        if args.profile:
            del trainer
            rows.append({"backend": "profile", "config": config,
                         "by_op_ms": profile_steps(folder, torch_step, feeds, args.threads)})
    except Exception as error:
        print(f"{config}: FAILED {type(error).__name__}: {error}", flush=True)
        traceback.print_exc()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_ort.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
    return 0


def result_rows(results: dict[str, tuple[float, list[float], list[float]]], config: str, tokens_per_step: int
                ) -> list[dict]:
    """Print each backend's median ms per step, tokens/s, losses and measured steps, and the ORT/PyTorch
    ratio when both ran; return them as JSON rows."""
    rows: list[dict] = []
    measured: dict[str, float] = {}
    for name, (ms, losses, step_ms) in results.items():
        measured[name] = ms
        tokens = tokens_per_step / (ms / 1e3)
        row = {"backend": name, "config": config, "ms_per_step": round(ms, 1), "tokens_per_s": round(tokens, 1),
               "losses": [round(v, 5) for v in losses],
               "step_ms": [round(v, 1) for v in step_ms]}
        rows.append(row)
        print(f"{name:24s} {config}: {ms:9.1f} ms/step (median)  {tokens:8.1f} tok/s  losses "
              + " ".join(f"{v:.4f}" for v in losses), flush=True)
        print(f"{'':24s} measured steps (ms): " + " ".join(f"{v:.0f}" for v in row["step_ms"]), flush=True)
    if len(measured) == 2:
        ratio = measured["ONNX Runtime training"] / measured["PyTorch eager"]
        rows.append({"backend": "ratio ORT/PyTorch", "config": config, "ratio": round(ratio, 3)})
        verdict = "meets" if ratio <= 1.0 else "misses"
        print(f"ratio ORT / PyTorch eager: {ratio:.2f}x  ({verdict} the goal <= 1.0x)", flush=True)
    return rows


def profile_ort_nodes(onnx_folder: Path, arrays: list, threads: int, steps: int = 5, kept: int = 3
                      ) -> tuple[list[tuple[float, float]], dict[str, tuple[str, str, list[float]]]]:
    """Run ``steps`` training steps of a fresh, profiled ORT session on ``onnx_folder``'s artifacts and read
    the profile back. Returns the wall ms of each step's (forward+backward, optimizer) and, per node, (op type,
    input shapes, its ms in each of the last ``kept`` steps): the first steps fill ONNX Runtime's memory arena
    and pay its page faults."""
    import collections
    import gc
    import glob

    import onnxruntime
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    # The training session alone (an evaluation session would write a profile of the same name over it).
    prefix = str(onnx_folder.parent / "ort_profile")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    state = CheckpointState.load_checkpoint(str(onnx_folder / "checkpoint"))
    module = Module(str(onnx_folder / "training_model.onnx"), state, device="cpu", session_options=options)
    optimizer = Optimizer(str(onnx_folder / "optimizer_model.onnx"), module)
    module.train()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        module(*arrays)
        middle = time.perf_counter()
        optimizer.step()
        module.lazy_reset_grad()
        walls.append((1e3 * (middle - start), 1e3 * (time.perf_counter() - middle)))
    del optimizer, module, state  # the profile is written when the session is released
    gc.collect()
    durations: dict[str, list[float]] = collections.defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    decoder = json.JSONDecoder()
    for path in glob.glob(prefix + "*.json"):
        text, position = Path(path).read_text(), 0
        while position < len(text):  # the training and optimizer sessions can write one file each or share one
            if text[position].isspace():
                position += 1
                continue
            events, position = decoder.raw_decode(text, position)
            for event in events if isinstance(events, list) else []:
                if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                    node = event["name"][: -len("_kernel_time")]
                    durations[node].append(event["dur"] / 1e3)
                    kinds[node] = (event["args"].get("op_name", "?"), str(event["args"].get("input_type_shape")))
    nodes = {}
    for node, values in durations.items():  # a node runs the same number of times each step
        runs = max(1, len(values) // steps)
        nodes[node] = (*kinds[node], [sum(values[i * runs:(i + 1) * runs]) for i in range(steps - kept, steps)])
    return walls, nodes


def profile_steps(folder: Path, torch_step, feeds: list, threads: int) -> dict[str, dict[str, float]]:
    """Profiled steps of each backend: milliseconds per step by op (ONNX op type / ATen op), largest first
    (ORT: the mean of steps 3–5 of a fresh training session; PyTorch: one step after the measured ones)."""
    import collections

    arrays = [f.numpy() if isinstance(f, torch.Tensor) else f for f in feeds]
    _, nodes = profile_ort_nodes(folder / "onnx", arrays, threads)
    ort: collections.Counter = collections.Counter()
    for op, _, per_step in nodes.values():
        ort[op] += sum(per_step) / len(per_step)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch_step()
    pytorch = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    result = {"ONNX Runtime training": dict(ort.most_common()),
              "PyTorch eager": dict(sorted(pytorch.items(), key=lambda kv: -kv[1]))}
    for name, by_op in result.items():
        total = sum(by_op.values())
        top = ", ".join(f"{op} {ms:.0f}" for op, ms in list(by_op.items())[:8])
        print(f"profile {name}: {total:.0f} ms of op time per step; largest (ms): {top}", flush=True)
    matmul_ort = sum(v for k, v in result["ONNX Runtime training"].items() if k in ("Gemm", "MatMul", "FusedMatMul"))
    matmul_pt = sum(v for k, v in result["PyTorch eager"].items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"profile: matrix multiplies {matmul_ort:.0f} ms (ORT) vs {matmul_pt:.0f} ms (PyTorch) per step", flush=True)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
