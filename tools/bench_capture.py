"""Capture + analysis time for hf:gpt2 at 12 and 24 layers on this CPU (issue: foundation).

Prints, per depth and batch dimension (dynamic, the default, or static: ``--static-batch``): plain
``torch.export.export(strict=False)`` with static shapes (the reference, same run), our capture (deep
copy + export + guard removal + GraphModule), our analysis (shapes, FLOPs, saved bytes), and their sum.
Goal: capture + analysis under 5 s for 24 layers.

    .venv/bin/python tools/bench_capture.py [--layers 12 24] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from effcompile.analysis import analyze
from effcompile.capture import capture
from effcompile.spec import load_hf_spec


def _best(function, repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - started)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rows = []
    print(f"{'layers':>6} {'batch dim':>9} {'nodes':>6} {'torch.export s':>15} {'capture s':>10} {'analysis s':>11} "
          f"{'capture+analysis s':>19}")
    for layers, dynamic in [(n, d) for n in args.layers for d in (True, False)]:
        spec = load_hf_spec("gpt2", {"n_layer": layers}, batch=2, seq=128)
        reference, _ = _best(lambda s=spec: torch.export.export(s.module, (), s.kwargs, strict=False), args.repeat)
        capture_s, program = _best(lambda s=spec, d=dynamic: capture(s, dynamic_batch=d), args.repeat)
        analysis_s, _ = _best(lambda p=program: analyze(p), args.repeat)
        row = {"layers": layers, "dynamic_batch": dynamic, "nodes": len(program.gm.graph.nodes), "torch_export_s": round(reference, 3),
               "capture_s": round(capture_s, 3), "analysis_s": round(analysis_s, 3),
               "total_s": round(capture_s + analysis_s, 3)}
        rows.append(row)
        print(f"{layers:>6} {'dynamic' if dynamic else 'static':>9} {row['nodes']:>6} {reference:>15.2f} {capture_s:>10.2f} {analysis_s:>11.2f} "
              f"{row['total_s']:>19.2f}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_capture.json"), "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
