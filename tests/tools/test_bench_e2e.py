"""``tools/bench_e2e.py``'s pieces: the interpolated time to target, the warm-up estimate, the ratios against the
best peer (and the lower bound when no peer reached the target), the time plan, and a CPU run of the baseline
row that writes its JSON (the whole ``--quick`` run takes about a minute on a shared 2-core machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_e2e  # noqa: E402
import e2e_report  # noqa: E402


def test_time_to_target_interpolates_the_crossing():
    validation = [{"val_loss": 3.0, "train_s": 10.0}, {"val_loss": 2.0, "train_s": 20.0},
                  {"val_loss": 1.5, "train_s": 30.0}]
    assert bench_e2e.time_to_target(validation, 2.5) == (20.0, 15.0)
    assert bench_e2e.time_to_target(validation, 3.5) == (10.0, 10.0)
    assert bench_e2e.time_to_target(validation, 1.0) == (None, None)


def test_warmup_excess_is_the_first_intervals_extra_time():
    history = [{"step_s": 5.0, "train_s": 5.0 * (i + 1)} for i in range(3)]  # 3 steps read back together
    history += [{"step_s": 1.0, "train_s": 15.0 + i} for i in range(4)] + [{"step_s": 1.2, "train_s": 20.0}]
    excess, steady = bench_e2e.warmup_excess(history)
    assert steady == 1.0 and excess == pytest.approx(12.0)
    assert bench_e2e.warmup_excess([]) == (0.0, None)


def test_comparisons_against_the_best_peer():
    def row(name, excl, incl, peak=10.0):
        return {"row": name, "status": "ok", "time_to_target_excl_overhead_s": excl,
                "time_to_target_incl_overhead_s": incl, "peak_gib": peak}

    results = {"a": row("a", 30, 32), "b": row("b", 40, 90), "c": row("c", 20, 22, 8.0), "d": {"status": "failed"},
               "e": row("e", 10, 60, 7.0), "f": row("f", 8, 40)}
    out = e2e_report.comparisons(results, 45.0)
    assert out["best_peer_excl_overhead"] == "c" and out["e_vs_best_peer_excl_overhead"] == "2.00×"
    assert out["best_peer_incl_overhead"] == "c" and out["f_vs_best_peer_incl_overhead"] == "0.55×"
    assert out["e_vs_baseline_excl_overhead"] == "3.00×" and "7.00 vs 8.00" in out["e_peak_vs_best_peer_excl_overhead"]
    slow = {**results, "c": {**row("c", None, None), "status": "ok"}, "b": {**row("b", None, None), "status": "ok"}}
    assert e2e_report.comparisons(slow, 45.0)["e_vs_best_peer_excl_overhead"] == "≥ 4.50×"


def test_time_plan_and_quick_setup():
    setup = bench_e2e.make_setup(bench_e2e.parse_args(["--t-max", "50"]))
    assert (setup.seq, setup.batch, setup.t_max) == (8192, 8, 50.0)
    plan = bench_e2e.projected_seconds(setup, "abcdefg")
    assert set(plan) == set("abcdefg") | {"startup"} and plan["e"] > plan["c"] > plan["a"] - 1
    quick = bench_e2e.make_setup(bench_e2e.parse_args(["--quick"]))
    assert quick.device == "cpu" and quick.seq * quick.batch == 512 and quick.auto_quick


def test_quick_baseline_row_writes_its_json(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench_e2e.main(["--quick", "--rows", "ab", "--t-base", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "bench_e2e.json").read_text())
    baseline = data["results"]["a"]
    assert baseline["status"] == "ok" and baseline["reached"] and data["target"] == baseline["best_val_loss"]
    assert baseline["tokens_per_s"] > 0 and baseline["validation"]
    assert data["results"]["b"]["status"] == "skipped" and (tmp_path / "bench_e2e.png").exists()
