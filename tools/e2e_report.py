"""The report of ``tools/bench_e2e.py``: ratios against the best peer row, the terminal table, the loss-vs-time
plot and the software versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ROWS = {"a": "HF eager (autocast bf16, SDPA)", "b": "HF + torch.compile", "c": "HF + Liger-Kernel",
        "d": "HF + Liger + torch.compile", "e": "effcompile --passes auto",
        "f": "effcompile --passes auto (auto.allow=sas)", "g": "(f) + AGA + LCLR (effcompile train)"}
PEERS = "bcd"


def comparisons(results: dict[str, dict[str, Any]], t_max: float) -> dict[str, Any]:
    """Each effcompile row's time to target against the best peer row (b–d) and the baseline, with and
    without overhead, and the goals (e ≥ 1.15× at ≤ the peer's peak; f/g ≥ 1.3×, stretch 1.89×)."""
    out: dict[str, Any] = {}
    peers = [results[r] for r in PEERS if results.get(r, {}).get("status") == "ok"]
    for measure in ("excl_overhead", "incl_overhead"):
        key = f"time_to_target_{measure}_s"
        reached = [p for p in peers if p.get(key) is not None]
        best = min(reached, key=lambda p: p[key]) if reached else None
        out[f"best_peer_{measure}"] = best["row"] if best else None
        for row in "efg":
            mine = results.get(row, {})
            if mine.get(key) is None:
                continue
            if best is not None:
                ratio, bound = best[key] / mine[key], ""
            elif peers:  # no peer reached the target within t_max: a lower bound
                ratio, bound = t_max / mine[key], "≥ "
            else:
                continue
            out[f"{row}_vs_best_peer_{measure}"] = f"{bound}{ratio:.2f}×"
            baseline = results.get("a", {}).get(key)
            if baseline:
                out[f"{row}_vs_baseline_{measure}"] = f"{baseline / mine[key]:.2f}×"
            if row == "e" and best is not None and mine.get("peak_gib") and best.get("peak_gib"):
                out[f"e_peak_vs_best_peer_{measure}"] = f"{mine['peak_gib']:.2f} vs {best['peak_gib']:.2f} GiB"
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (f"{'row':3s} {'configuration':42s} {'to target':>10s} {'excl. ovh':>10s} {'incl. prep':>10s} "
              f"{'tok/s':>10s} {'peak GiB':>8s} {'final val':>9s} {'prep s':>7s} {'warm s':>7s}")
    print(header)
    for row in "abcdefg":
        r = results.get(row)
        if r is None:
            continue
        if r["status"] != "ok":
            print(f"{row:3s} {r['name']:42s} {r['status']}: {r.get('error', '')}")
            continue

        def fmt(value: Any, digits: int = 1) -> str:
            return "-" if value is None else f"{value:.{digits}f}"
        print(f"{row:3s} {r['name']:42s} {fmt(r['time_to_target_s']):>10s} "
              f"{fmt(r.get('time_to_target_excl_overhead_s')):>10s} {fmt(r.get('time_to_target_incl_overhead_s')):>10s} "
              f"{fmt(r['tokens_per_s'], 0):>10s} {fmt(r['peak_gib'], 2):>8s} {fmt(r['final_val_loss'], 4):>9s} "
              f"{fmt(r['prep_s']):>7s} {fmt(r['warmup_s']):>7s}")


def plot(results: dict[str, dict[str, Any]], target: float | None, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(8, 5))
    for row in "abcdefg":
        r = results.get(row)
        if not r or r["status"] != "ok" or not r.get("validation"):
            continue
        times = [r["prep_s"] + v["train_s"] for v in r["validation"]]
        axes.plot(times, [v["val_loss"] for v in r["validation"]], "o-", ms=2, label=f"{row}: {r['name']}")
    if target is not None:
        axes.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.4f}")
    axes.set_xlabel("seconds (preparation + training, validation excluded)")
    axes.set_ylabel("validation loss")
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def environment() -> dict[str, Any]:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for name in ("liger_kernel", "torchao"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except ImportError:
            info[name] = None
    return info
