"""Where a training step's memory goes: the tensors autograd saves for backward, by op and dtype, per node.

For each configuration, one forward runs through an ``torch.fx.Interpreter`` that attributes every tensor
autograd saves (distinct storages, parameters excluded) to the graph node executing at that moment; then
one full training step measures the real allocator figures: memory held after the forward (weights +
saved activations) and the step's peak. Configurations:

  gpt2-autocast  GPT-2-medium shapes (bench_amp's model), captured, under ``torch.autocast`` bf16
  gpt2-amp       the same graph after the ``amp`` pass (bf16), no autocast
  llama-lora     bench_lora's TinyLlama-1.1B shapes, ``lora`` with a bfloat16 base, under autocast bf16
  llama-lora-remat  the same followed by ``remat`` (budget 0.5)

Prints per configuration the saved bytes by (op, dtype), the largest nodes, and for pairs (autocast vs amp)
the ops whose saved bytes differ most. Writes ``$OUT/memory_breakdown.json`` when ``OUT`` is set.

    python3 tools/memory_breakdown.py --device cuda
    python3 tools/memory_breakdown.py --quick              # tiny shapes on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.fx

from effcompile.analysis import parameter_storages, storage_key
from effcompile.graph import op_name

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

GIB = 2**30


class _Attributing(torch.fx.Interpreter):
    """Runs the graph and remembers which node is executing (nested graph modules count as their caller)."""

    current: torch.fx.Node | None = None

    def run_node(self, node: torch.fx.Node) -> Any:
        self.current = node
        return super().run_node(node)


def _op(node: torch.fx.Node | None) -> str:
    if node is None:
        return "<outside the graph>"
    if node.op == "call_function":
        return op_name(node) or str(node.target)
    if node.op in ("call_method", "call_module"):
        return f"{node.op}:{node.target}"
    return node.op


def saved_by_node(gm: torch.fx.GraphModule, inputs: list[Any], autocast: bool, device: str
                  ) -> dict[str, Any]:
    """Saved-for-backward bytes of one forward of ``gm``, by (op, dtype) and by node (parameters excluded)."""
    parameters = parameter_storages(gm)
    seen: set[tuple[int, str]] = set()
    keep: list[torch.Tensor] = []
    by_op: dict[str, int] = defaultdict(int)
    by_node: dict[str, int] = defaultdict(int)
    interpreter = _Attributing(gm)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in seen and key not in parameters:
            seen.add(key)
            size = tensor.untyped_storage().nbytes()
            node = interpreter.current
            by_op[f"{_op(node)} [{str(tensor.dtype).replace('torch.', '')}]"] += size
            by_node[node.name if node is not None else "-"] += size
        keep.append(tensor.detach())
        return tensor

    context = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad(), context:
        output = interpreter.run(*inputs)
    del output
    keep.clear()
    return {"total": sum(by_op.values()), "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_node": dict(sorted(by_node.items(), key=lambda kv: -kv[1])[:25])}


def step_memory(gm: torch.nn.Module, inputs: list[Any], autocast: bool, device: str) -> dict[str, float]:
    """One training step (forward, backward, fused AdamW): GiB held after the forward and at the peak."""
    if device != "cuda":
        return {}
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-5, fused=True)
    figures: dict[str, float] = {}
    for _ in range(2):  # the second step has the optimizer state (what training sees)
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        context = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            output = gm(*inputs)
        loss = output["loss"] if isinstance(output, dict) else output.loss if hasattr(output, "loss") else output[0]
        del output
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        figures = {"held_before_gib": before / GIB, "activations_after_forward_gib": (after_forward - before) / GIB,
                   "peak_gib": torch.cuda.max_memory_allocated() / GIB}
    del optimizer
    return figures


def gpt2_program(quick: bool, device: str, passes: list[str]) -> Any:
    """bench_amp's GPT-2 (medium shapes, or tiny with ``quick``) captured and rewritten by ``passes``."""
    from bench_amp import FULL, QUICK, build_model

    import effcompile

    shape = QUICK if quick else FULL
    model = build_model(shape, device, None)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    result = effcompile.compile(model, {"input_ids": ids, "labels": ids}, passes=passes, verify=False, measure=False)
    return result.program


def llama_program(quick: bool, device: str, passes: list[str]) -> Any:
    """bench_lora's Llama (TinyLlama-1.1B shapes, or tiny with ``quick``) with ``passes`` (lora: bf16 base)."""
    import bench_lora

    shapes = bench_lora.QUICK if quick else bench_lora.FULL
    ids = torch.randint(0, shapes.vocab, (shapes.batch, shapes.seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    builder = bench_lora.make_ours(passes, {"base_dtype": "bfloat16"})
    gm = builder(shapes, torch.device(device), ids)
    from effcompile.program import Program

    return Program(gm, (), {"input_ids": ids, "labels": ids}, None, "export", "llama")


CONFIGS = {
    "gpt2-autocast": (lambda q, d: gpt2_program(q, d, []), True),
    "gpt2-amp": (lambda q, d: gpt2_program(q, d, ["amp"]), False),
    "llama-lora": (lambda q, d: llama_program(q, d, ["lora"]), True),
    "llama-lora-remat": (lambda q, d: llama_program(q, d, ["lora", "remat"]), True),
}


def main(argv: list[str] | None = None) -> int:
    """Measure each configuration in ``--configs`` and print its breakdown; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in [c for c in args.configs.split(",") if c]:
        make, autocast = CONFIGS[name]
        try:
            program = make(args.quick, args.device)
            if autocast:  # the captured graph must not pin float32 dtypes to run under autocast
                from effcompile.passes.amp import relax_dtype_asserts

                relax_dtype_asserts(program.gm.graph)
                program.gm.recompile()
            inputs = program.flat_inputs()
            saved = saved_by_node(program.gm, inputs, autocast, args.device)
            saved.update(step_memory(program.gm, inputs, autocast, args.device))
            results[name] = saved
            print(f"=== {name}: saved for backward {saved['total'] / GIB:.3f} GiB; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in saved.items() if k.endswith("_gib")), flush=True)
            for key, size in list(saved["by_op"].items())[:18]:
                print(f"  {size / GIB:8.3f} GiB  {key}", flush=True)
            print("  largest nodes: " + ", ".join(f"{n} {s / 2**20:.0f} MiB" for n, s in
                                                  list(saved["by_node"].items())[:10]), flush=True)
        except Exception as error:  # one broken configuration must not stop the others
            print(f"=== {name}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        finally:
            program = None
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if "gpt2-autocast" in results and "gpt2-amp" in results:
        first, second = results["gpt2-autocast"]["by_op"], results["gpt2-amp"]["by_op"]
        diffs = sorted(((second.get(k, 0) - first.get(k, 0), k) for k in set(first) | set(second)),
                       key=lambda item: -abs(item[0]))
        print("=== amp − autocast, saved bytes by (op, dtype):", flush=True)
        for diff, key in diffs[:15]:
            print(f"  {diff / GIB:+8.3f} GiB  {key}", flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "memory_breakdown.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
