# ruff: noqa: B023 — each check calls its lambdas at once, inside the loop iteration that made them
"""GPU smoke test of ``fuse``'s Liger backend: each fused op with ``backend="liger"`` against the exact
reference kernels (outputs and gradients), in float32 (tolerance 1e-4 relative) and bf16 (2e-2), on CUDA with
liger-kernel installed; then ``lora,fuse`` on a small Llama verifies. Prints one line per check and exits 1 on a
failure (0 and "all passed" otherwise).

    python3 tools/gpu_smoke_fuse.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effcompile.passes.fuse import liger, ops  # noqa: E402


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(1)
    sum((o.float() * torch.randn(o.shape, device=o.device)).sum() for o in outs if o is not None).backward()
    return [o.detach().float() for o in outs if o is not None] + [t.grad.float() for t in tensors if t.grad is not None]


def check(name: str, fn, tensors, tolerance: float) -> bool:
    """Compare ``fn(backend="liger")`` with ``fn(backend="reference")``; print and return success."""
    mine = _grads(lambda *t: fn(*t, backend="liger"), tensors)
    ref = _grads(lambda *t: fn(*t, backend="reference"), tensors)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(mine, ref))
    ok = len(mine) == len(ref) and worst <= tolerance
    print(f"{'ok  ' if ok else 'FAIL'} {name:40s} max rel error {worst:.2e} (tolerance {tolerance:g})", flush=True)
    return ok


def main() -> int:
    """Run every check; 0 when all pass."""
    if not torch.cuda.is_available() or not liger.available():
        print("needs CUDA and liger-kernel (pip install liger-kernel==0.8.5)")
        return 2
    device, results = "cuda", []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        tag = str(dtype).removeprefix("torch.")
        x, w = torch.randn(4, 256, 2048, device=device, dtype=dtype), torch.randn(2048, device=device, dtype=dtype)
        results.append(check(f"rms_norm llama {tag}", lambda x, w, backend: ops.rms_norm(
            x, w, 1e-6, mid_dtype=dtype, backend=backend), [x, w], tolerance))
        results.append(check(f"rms_norm gemma {tag}", lambda x, w, backend: ops.rms_norm(
            x, w, 1e-6, offset=1.0, weight_float=True, out_dtype=dtype, backend=backend), [x, w], tolerance))
        b = torch.randn(2048, device=device, dtype=dtype)
        results.append(check(f"layer_norm {tag}", lambda x, w, b, backend: ops.layer_norm(x, w, b, 1e-5, backend=backend),
                             [x, w, b], tolerance))
        a, g = torch.randn(4, 256, 5632, device=device, dtype=dtype), torch.randn(4, 256, 5632, device=device, dtype=dtype)
        for kind in ("silu", "gelu_tanh"):
            results.append(check(f"glu {kind} {tag}", lambda a, g, backend, kind=kind: ops.gated_activation(
                a, g, kind, backend=backend), [a, g], tolerance))
        q = torch.randn(4, 256, 32, 64, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(4, 256, 4, 64, device=device, dtype=dtype).transpose(1, 2)
        angle = torch.randn(1, 1, 256, 32, device=device).repeat(1, 1, 1, 2)
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        results.append(check(f"rope pair {tag}", lambda q, k, backend: ops.rotary_embedding(
            q, k, cos, sin, 32, backend=backend), [q, k], tolerance))
        h, lm = torch.randn(2048, 2048, device=device, dtype=dtype), torch.randn(32000, 2048, device=device, dtype=dtype) * 0.02
        target = torch.randint(0, 32000, (2048,), device=device)
        target[:100] = -100
        results.append(check(f"linear_cross_entropy {tag}", lambda h, lm, backend: ops.linear_cross_entropy(
            h, lm, None, target, backend=backend)[0], [h, lm], tolerance))
    results.append(_llama_verifies())
    print("all passed" if all(results) else f"{results.count(False)} FAILED", flush=True)
    return 0 if all(results) else 1


def _llama_verifies() -> bool:
    import effcompile
    from effcompile.spec import load_hf_spec

    spec = load_hf_spec("llama", dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=1024), batch=2, seq=128)
    model = spec.module.cuda()
    inputs = {k: v.cuda() for k, v in spec.kwargs.items()}
    result = effcompile.compile(model, inputs, passes=["lora", "fuse"], measure=False)
    record = result.report.records[-1]
    ok = record.verify.ok and record.details["backend"] == "liger"
    print(f"{'ok  ' if ok else 'FAIL'} lora,fuse on a small Llama (cuda, float32): {record.details['summary']}; "
          f"output rel {record.verify.output_max_rel:.1e}, grad rel {record.verify.grad_max_rel:.1e}", flush=True)
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
