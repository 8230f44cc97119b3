"""GPU checks of the fast training path and of ``--passes auto`` (the parts the CPU tests cannot reach).

1. The prefetcher on CUDA (pinned host batches, copies on a side stream) yields exactly ``Batches.batch(i)``
   on the device, in order.
2. A training step of an effcompile module (``amp`` casts, fused AdamW, gradient clipping) makes no host
   synchronisation: it runs under ``torch.cuda.set_sync_debug_mode("error")``.
3. The trainer reading losses back every 10 steps with prefetching gives the same losses as reading them
   every step (same device, same seed; the first identical, later ones within 1% — attention's backward may
   use atomics).
4. ``auto`` on a small Llama on CUDA picks a stack, times a compiled twin when the cost model expects a gain,
   leaves an ``ExecutionPlan``; the trainer follows it and the loss goes down.

    source tools/device_env.sh && python3 tools/gpu_smoke_train.py          # ~2-3 minutes on an H200
Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import traceback
from collections.abc import Callable

import torch


def llama_spec(seq: int, batch: int) -> object:
    from effcompile.spec import load_hf_spec

    spec = load_hf_spec("llama", dict(num_hidden_layers=4, hidden_size=256, intermediate_size=688,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                      max_position_embeddings=seq), batch=batch, seq=seq)
    spec.module.to("cuda")
    spec.kwargs = {k: v.to("cuda") for k, v in spec.kwargs.items()}
    return spec


def check_prefetcher() -> str:
    from effcompile.train.data import Batches, load_corpus
    from effcompile.train.prefetch import Prefetcher

    corpus = load_corpus("stdlib", max_bytes=2_000_000)
    batches = Batches(corpus.train, 8, 1024, seed=3)
    with Prefetcher(batches.batch, 7, "cuda", depth=3) as prefetcher:
        got = [prefetcher.next() for _ in range(12)]
    assert all(t.is_cuda for t in got)
    assert all(torch.equal(t.cpu(), batches.batch(7 + i)) for i, t in enumerate(got)), "prefetched batches differ"
    return "12 batches in index order on cuda"


def check_no_sync() -> str:
    import effcompile
    from effcompile.train import TrainConfig
    from effcompile.train.backends import TorchBackend
    from effcompile.train.data import Batches, load_corpus

    result = effcompile.compile(llama_spec(512, 4), passes=["amp"], verify=False, measure=False)
    backend = TorchBackend(result, TrainConfig(batch=4, seq=512, grad_clip=1.0, lclr=True))
    batches = Batches(load_corpus("stdlib", max_bytes=1_000_000).train, 4, 512)
    on_device = [batches.batch(i).cuda() for i in range(3)]
    backend.train_step(lambda: on_device[0], 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outcome = backend.train_step(lambda: on_device[1], 1)
        backend.train_step(lambda: on_device[2], 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fused = all(group.get("fused") for group in backend.optimizer.param_groups)
    assert fused, "AdamW is not fused on CUDA"
    return f"two steps without a host sync (fused AdamW, clipping, LCLR); loss {float(outcome.loss):.4f}"


def check_read_back() -> str:
    import effcompile
    from effcompile.train import TrainConfig, train
    from effcompile.train.data import load_corpus

    corpus = load_corpus("stdlib", max_bytes=2_000_000)
    base = effcompile.compile(llama_spec(512, 4), passes=["amp"], verify=False, measure=False)
    losses = {}
    for log_every in (1, 10):
        model = dataclasses.replace(base, module=copy.deepcopy(base.module))
        config = TrainConfig(steps=25, batch=4, seq=512, lr=1e-3, eval_every=10, eval_batches=1, log_every=log_every)
        losses[log_every] = [r["loss"] for r in train(model, corpus, config).history]
    # Same kernels in the same order; attention's backward may use atomics, so later steps can differ in the
    # last bits: the first loss must be identical, the rest within 1%.
    assert losses[1][0] == losses[10][0], f"first losses differ: {losses[1][0]} vs {losses[10][0]}"
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses[1], losses[10]))
    assert worst < 0.01 and losses[1][-1] < losses[1][0], f"losses differ by {worst:.2%}"
    identical = "identical" if losses[1] == losses[10] else f"within {worst:.1e}"
    return f"25 steps, losses {identical} ({losses[1][0]:.3f} → {losses[1][-1]:.3f})"


def check_auto() -> str:
    import effcompile
    from effcompile.train import TrainConfig, train
    from effcompile.train.data import load_corpus

    result = effcompile.compile(llama_spec(1024, 8), passes=["auto"], options={"auto": {"budget_seconds": 30}})
    details = result.report.record("auto").details
    plan = result.execution
    print("   candidates:")
    for row in details["candidates"]:
        measured = row["measured_step_seconds"]
        print(f"     {row['label']:60s} {row['status']:11s} "
              f"pred {1e3 * (row['predicted_step_seconds'] or 0):7.2f} ms  "
              f"meas {'-' if measured is None else f'{1e3 * measured:7.2f} ms'}  {row['reason'][:80]}")
    assert plan.chosen_by == "auto" and list(plan.stack) == details["winner"]["passes"]
    assert any(row["compile"] for row in details["candidates"]), "no compiled candidate on CUDA"
    run = train(result, load_corpus("stdlib", max_bytes=4_000_000),
                TrainConfig(steps=30, batch=8, seq=1024, lr=1e-3, eval_every=15, eval_batches=1))
    losses = [r["loss"] for r in run.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    return (f"chose {details['winner']['label']} (compile={plan.compile}) in {details['search_seconds']:.1f} s "
            f"(compiling {details['compile_seconds']:.1f} s); trained {losses[0]:.3f} → {losses[-1]:.3f}")


CHECKS: dict[str, Callable[[], str]] = {"prefetcher": check_prefetcher, "no host sync": check_no_sync,
                                        "read-back every 10": check_read_back, "auto on CUDA": check_auto}


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"ok    {name}: {check()}", flush=True)
        except Exception as error:  # report every check
            failed += 1
            traceback.print_exc()
            print(f"FAIL  {name}: {type(error).__name__}: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
