"""The pieces of the fast training path that run on the CPU too: the prefetcher's order, determinism and error
handling, a training step that reads nothing back from the device, losses read back at log intervals with
the same values, the compile decision, and the loss curve files."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import pytest
import torch

import effcompile
from effcompile.plans import ExecutionPlan
from effcompile.train import TrainConfig, Trainer
from effcompile.train.backends import TorchBackend
from effcompile.train.data import Batches, load_corpus
from effcompile.train.prefetch import Prefetcher

from conftest import example_gpt_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", max_bytes=60_000)


@pytest.fixture(scope="module")
def compiled():
    return effcompile.compile(example_gpt_spec(), verify=False, measure=False)


def test_prefetcher_yields_batches_in_index_order(corpus):
    batches = Batches(corpus.train, 3, 16, seed=2)
    with Prefetcher(batches.batch, 5, "cpu", depth=2) as prefetcher:
        got = [prefetcher.next() for _ in range(6)]
        assert prefetcher.position == 11
    for offset, tensor in enumerate(got):
        assert torch.equal(tensor, batches.batch(5 + offset))
    with Prefetcher(batches.batch, 8, "cpu", depth=3) as again:  # restarting at a position replays the stream
        assert all(torch.equal(again.next(), got[3 + i]) for i in range(3))


def test_prefetcher_runs_ahead_and_reraises_in_order():
    made: list[int] = []
    ready = threading.Event()

    def make(index: int) -> torch.Tensor:
        made.append(index)
        if index == 3:
            ready.set()
        if index == 4:
            raise ValueError("broken batch 4")
        return torch.tensor([index])

    with Prefetcher(make, 0, depth=3) as prefetcher:
        assert prefetcher.next().item() == 0
        assert ready.wait(5)  # the thread built batches ahead of use
        assert [prefetcher.next().item() for _ in range(3)] == [1, 2, 3]
        with pytest.raises(ValueError, match="broken batch 4"):
            prefetcher.next()
    assert made[:5] == [0, 1, 2, 3, 4]


def test_training_step_reads_nothing_back(compiled, corpus, monkeypatch):
    backend = TorchBackend(compiled, TrainConfig(batch=2, seq=64, grad_clip=1.0, lclr=True))
    batches = Batches(corpus.train, 2, 64)
    backend.train_step(lambda: batches.batch(0), 0)  # first step: optimizer state allocated
    # AdamW's step counters are host tensors unless fused (CUDA): reading them is no device sync.
    counters = {id(state["step"]) for state in backend.optimizer.state.values()}
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            if id(self) not in counters:
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    outcome = backend.train_step(lambda: batches.batch(1), 1)
    monkeypatch.undo()
    assert reads == [] and isinstance(outcome.loss, torch.Tensor) and outcome.loss.dim() == 0


def test_losses_read_back_at_log_intervals_equal_per_step_reads(compiled, corpus, tmp_path):
    def run(log_every: int, folder=None) -> list[dict]:
        model = dataclasses.replace(compiled, module=copy.deepcopy(compiled.module))
        config = TrainConfig(steps=5, batch=1, seq=64, lr=3e-3, eval_every=2, eval_batches=1, log_every=log_every)
        seen: list[dict] = []
        Trainer(model, corpus, config, log_dir=folder).run(seen.append)
        return seen

    every_step = run(1)
    batched = run(3, tmp_path)
    assert [r["step"] for r in batched] == list(range(5))
    assert [r["loss"] for r in batched] == [r["loss"] for r in every_step]
    assert all(isinstance(r["loss"], float) and r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in batched)
    assert [r["train_s"] for r in batched] == sorted(r["train_s"] for r in batched)
    assert ["val_loss" in r for r in batched] == [False, True, False, True, True]
    curve = json.loads((tmp_path / "loss_curve.json").read_text())
    assert [p["loss"] for p in curve["train"]] == [r["loss"] for r in batched]
    assert len(curve["validation"]) == 3 and (tmp_path / "loss_curve.png").stat().st_size > 0


def test_compile_decision_follows_the_plan(compiled):
    eager = TorchBackend(compiled, TrainConfig(batch=2, seq=64))
    assert not eager.compiled and eager.runner is compiled.module
    plan = ExecutionPlan(compile=True, stack=(), chosen_by="auto")
    planned = TorchBackend(compiled, TrainConfig(batch=2, seq=64), execution=plan)
    assert planned.compiled and planned.runner is not compiled.module
    assert not TorchBackend(compiled, TrainConfig(batch=2, seq=64, compile="off"), execution=plan).compiled
    compiled.program.set_plan(plan)
    try:
        from_result = TorchBackend(compiled, TrainConfig(batch=2, seq=64))
        assert from_result.compiled and from_result.runner is compiled.runnable()
    finally:
        compiled.program.plans.pop(ExecutionPlan)
