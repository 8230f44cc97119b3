"""Round-trip check of the saved module format on a device: compile, save, load onto the device, compare.

For each architecture × pass set it compiles on ``--device``, saves to a temporary folder, loads the folder
back onto the device, and compares the loaded module with the compiled one on the same inputs: the
forward output bit for bit (no_grad) and every parameter gradient (``torch.testing.assert_close``; CUDA's
embedding backward accumulates with atomics, so gradients are compared to float32 round-off). Prints one
line per case and ``ALL OK`` at the end; exits 1 on the first mismatch.

    python tools/check_saved_module.py --device cuda --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import effcompile
from effcompile.spec import load_hf_spec

TINY = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
    "llama": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
    "bert": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=256,
                 max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
CASES = [
    ("gpt2", ["lora", "sas", "amp", "remat"], {"sas": {"block_size": 128, "window": 128}, "remat": {"budget": 0.5}}),
    ("llama", ["lowrank", "amp", "remat"], {"lowrank": {"rank": 8}, "amp": {"cast_params": "once"},
                                           "remat": {"policy": "blocks"}}),
    ("bert", ["pipeline"], {}),
    ("llama", ["lora", "sas", "amp", "remat"], {"sas": {"block_size": 128, "window": 128}}),
    # fuse's Liger kernels and remat's offload to host memory exist on CUDA only
    ("llama", ["sas", "fuse", "amp", "remat"], {"sas": {"block_size": 128, "window": 128},
                                                "remat": {"policy": "blocks"}}),
    ("gpt2", ["remat"], {"remat": {"policy": "blocks", "offload": "on", "link_bandwidth": 1e18,
                                   "offload_min_bytes": 0}}),
]


def _loss(output: object) -> torch.Tensor:
    return output.loss if getattr(output, "loss", None) is not None else output.float().pow(2).mean()  # type: ignore[union-attr]


def check(arch: str, passes: list[str], options: dict, device: torch.device, scale: int) -> str:
    """Compile, save, load onto ``device`` and compare; returns a one-line summary (AssertionError on a
    mismatch)."""
    config = dict(TINY[arch])
    if scale > 1:
        config.update({k: v * scale for k, v in config.items() if k in ("n_layer", "num_hidden_layers")})
    spec = load_hf_spec(arch, config, batch=2, seq=256)
    spec.module.to(device)
    spec.kwargs = {k: v.to(device) for k, v in spec.kwargs.items()}
    result = effcompile.compile(spec, passes=passes, options=options, measure=False, verify=False)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result.save(str(Path(folder) / "out"))
        saved = time.perf_counter()
        loaded = effcompile.load(str(Path(folder) / "out"), device=device)
        done = time.perf_counter()
    args, kwargs = result.program.args, result.program.kwargs
    with torch.no_grad():
        torch.manual_seed(0)
        want = _loss(result.module(*args, **kwargs))
        torch.manual_seed(0)
        got = _loss(loaded(*args, **kwargs))
    assert torch.equal(want, got), f"{arch} {passes}: forward differs ({want.item()} vs {got.item()})"
    grads = []
    for module in (result.module, loaded):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        _loss(module(*args, **kwargs)).backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys(), f"{arch} {passes}: different parameters have gradients"
    worst = 0.0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=lambda m, n=name: f"{arch} {passes} {n}: {m}")
        worst = max(worst, float((grads[1][name] - grad).abs().max()))
    return (f"OK {arch:6} {','.join(passes):22} loss {want.item():.6f} (bit-equal)  max |Δgrad| {worst:.2e}  "
            f"save {saved - started:.2f}s load {done - saved:.2f}s")


def main() -> int:
    """Run every case; 0 when all round trips match, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2-layer models (default: 6 layers)")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        for arch, passes, options in CASES:
            print(check(arch, passes, options, device, 1 if args.quick else 3), flush=True)
    except AssertionError as error:
        print(f"MISMATCH {error}")
        return 1
    print("ALL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
