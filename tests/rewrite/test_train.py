"""The training side: AGA's N against its formula on gradients of known variance, LCLR's per-layer
learning rates at t = 0, T/2, T, optimizers by name, checkpoint/resume onto the same trajectory, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

import effcompile
from effcompile.cli.train import main as train_main
from effcompile.errors import OptionError, OutputError, SpecError
from effcompile.train import (
    AdaptiveAccumulation,
    GradientVarianceMeter,
    TrainConfig,
    Trainer,
    accumulation_steps,
    build_optimizer,
    input_builder,
    parameter_layers,
    train,
)
from effcompile.train.data import load_corpus

from conftest import tiny_spec

SEQ = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", max_bytes=100_000)


@pytest.fixture(scope="module")
def compiled():
    """A tiny HF GPT-2 (byte vocabulary, dropout on so resume must restore the RNG), captured by export."""
    spec = tiny_spec("gpt2", seq=SEQ, vocab_size=256, resid_pdrop=0.1, embd_pdrop=0.1)
    return effcompile.compile(spec, verify=False, measure=False)


def fresh(result):
    """The same compiled model with its own copy of the initial weights."""
    return dataclasses.replace(result, module=copy.deepcopy(result.module))


class NoisyGradient(torch.nn.Module):
    """Its loss's gradient with respect to ``w`` is μ + σ·z (z standard normal, drawn per call): micro-batch
    gradients of known per-coordinate variance σ², whatever the tokens."""

    def __init__(self, size: int, sigma: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(size))
        self.sigma = sigma

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        noise = 0.3 + self.sigma * torch.randn(self.w.shape)
        return {"loss": (self.w * noise).sum() + 0 * idx.float().mean()}


# ------------------------------------------------------------------------------------------------ AGA

@pytest.mark.parametrize(("sigma2", "alpha", "epsilon", "max_accum", "expected"), [
    (0.25, 1.0, 0.5, 16, 1), (0.25, 1.0, 0.2, 16, 7), (1.0, 2.0, 0.5, 16, 8), (1.0, 2.0, 0.5, 5, 5),
    (1e-12, 1.0, 1.0, 16, 1), (float("inf"), 1.0, 1.0, 9, 9)])
def test_accumulation_formula(sigma2, alpha, epsilon, max_accum, expected):
    assert accumulation_steps(sigma2, alpha, epsilon, max_accum) == expected
    if math.isfinite(sigma2):
        assert expected == min(max(math.ceil(alpha * sigma2 / epsilon ** 2), 1), max_accum)


@pytest.mark.parametrize("n", [2, 5])
def test_variance_meter_measures_known_variance(n):
    torch.manual_seed(0)
    model = NoisyGradient(50_000, sigma=0.5)
    meter = GradientVarianceMeter(list(model.parameters()))
    estimates = []
    for _ in range(3):
        model.zero_grad()
        meter.start(n)
        for _ in range(n):
            (model(torch.zeros(1, 2))["loss"] / n).backward()
            meter.after_backward()
        estimates.append(meter.finish())
    assert all(abs(e - 0.25) / 0.25 < 0.03 for e in estimates)
    meter.start(1)
    model.zero_grad()
    model(torch.zeros(1, 2))["loss"].backward()
    meter.after_backward()
    assert meter.finish() is None


@pytest.mark.parametrize("relative", [False, True])
def test_aga_in_the_loop_follows_the_formula(tmp_path, relative):
    """Through train(): σ²_g converges to the known σ² = 0.25 and every step's N is the formula of the σ²_g
    the previous step left: absolute ε = 0.235 gives α σ²/ε² = 4.53 → N = 5; relative ε = 0.786 (of the
    gradient RMS, |G|²/P = 0.3² = 0.09) gives α σ²/(ε²·0.09) = 4.50 → N = 5."""
    text = tmp_path / "data.txt"
    text.write_bytes(bytes(range(256)) * 8)
    torch.manual_seed(0)
    model = NoisyGradient(20_000, sigma=0.5)
    epsilon = 0.786 if relative else 0.235
    config = TrainConfig(steps=8, batch=1, seq=8, lr=1e-6, aga=True, aga_alpha=1.0, aga_epsilon=epsilon, max_accum=16,
                         accum=1, eval_every=0, eval_batches=1, grad_clip=0.0, aga_relative=relative)
    result = train(model, load_corpus(text), config)
    history = result.history
    assert history[0]["accum"] == 2  # no estimate yet: a 2-micro-batch measurement
    for before, step in zip(history, history[1:]):
        scale = before["signal"] if relative else 1.0
        assert step["accum"] == accumulation_steps(before["sigma2"] / scale, 1.0, epsilon, 16)
        assert step["accum_rule"] == step["accum"]
    assert all(abs(h["step_sigma2"] - 0.25) / 0.25 < 0.05 for h in history)
    if relative:
        assert all(abs(h["signal"] - 0.09) / 0.09 < 0.05 for h in history)
    assert [h["accum"] for h in history[1:]] == [5] * 7
    assert history[-1]["tokens"] == sum(h["accum"] for h in history) * 8


def test_aga_clamps_and_probes():
    aga = AdaptiveAccumulation(alpha=1.0, epsilon=1.0, max_accum=4, probe_every=3, initial=3)
    assert aga.next_accum() == 3  # before any estimate: the initial N (≥ 2, so it measures)
    aga.observe(100.0)
    assert aga.rule() == 4 and aga.next_accum() == 4
    aga.sigma2 = 1e-6
    assert [aga.next_accum() for _ in range(6)] == [1, 1, 2, 1, 1, 2]
    auto = AdaptiveAccumulation(alpha=2.0, epsilon=None, max_accum=16, initial=4)
    auto.observe(0.01)  # ε calibrated so that N starts at `initial`
    assert auto.rule() == 4 and auto.epsilon == pytest.approx(math.sqrt(2.0 * 0.01 / 4))
    auto.observe(0.03)  # EMA 0.9·0.01 + 0.1·0.03 = 0.012 → N = ⌈4 · 1.2⌉ = 5
    assert auto.sigma2 == pytest.approx(0.012) and auto.rule() == 5
    restored = AdaptiveAccumulation()
    restored.load_state_dict(auto.state_dict())
    assert restored == auto


# ----------------------------------------------------------------------------------------------- LCLR

class Stack(torch.nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 8)
        self.h = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(blocks))
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.h:
            x = block(x)
        return self.head(self.norm(x))


def test_parameter_layers():
    layers, total = parameter_layers(Stack(3))
    assert total == 4
    assert layers["embed.weight"] == 0 and layers["h.0.weight"] == 1 and layers["h.2.bias"] == 3
    assert layers["norm.weight"] == 4 and layers["head.weight"] == 4


def test_parameter_layers_of_exported_gpt2(compiled):
    layers, total = parameter_layers(compiled.module)
    assert total == 3  # 2 blocks
    assert layers["transformer.wte.weight"] == 0 and layers["transformer.wpe.weight"] == 0
    assert layers["transformer.h.0.attn.c_attn.weight"] == 1 and layers["transformer.h.1.mlp.c_fc.bias"] == 2
    assert layers["transformer.ln_f.weight"] == 3


@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "lion"])
def test_lclr_learning_rates_at_0_half_and_end(optimizer):
    steps, lr, gamma = 10, 0.01, 0.3
    model = Stack(3)
    config = TrainConfig(steps=steps, lr=lr, lclr=True, lclr_gamma=gamma, optimizer=optimizer)
    opt, scheduler = build_optimizer(model, config)
    assert [g["layer"] for g in opt.param_groups] == [0, 1, 2, 3, 4]  # one group per layer
    expected = {t: [lr * gamma ** (layer / 4) * (1 + math.cos(math.pi * t / steps)) / 2 for layer in range(5)]
                for t in (0, steps // 2, steps)}
    seen = {}
    for t in range(steps + 1):
        seen[t] = [g["lr"] for g in opt.param_groups]
        opt.step()
        scheduler.step()
    for t, rates in expected.items():
        assert seen[t] == pytest.approx(rates, abs=1e-12)
    assert seen[steps // 2] == pytest.approx([lr * gamma ** (layer / 4) / 2 for layer in range(5)])
    assert seen[steps] == pytest.approx([0.0] * 5, abs=1e-12)


def test_warmup_and_constant_schedule():
    model = Stack(1)
    opt, scheduler = build_optimizer(model, TrainConfig(steps=10, lr=1.0, warmup=4, schedule="constant"))
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 6)
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)  # no layer factor without lclr
    opt, scheduler = build_optimizer(model, TrainConfig(steps=10, lr=1.0, warmup=2, lclr=True, lclr_gamma=0.5))
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.5 * 0.5)  # head: γ¹ × warm-up 1/2
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # peak after warm-up, cosine starts


def test_optimizers_by_name():
    import pytorch_optimizer

    classes = {"adamw": torch.optim.AdamW, "lamb": pytorch_optimizer.Lamb, "lion": pytorch_optimizer.Lion}
    for name, cls in classes.items():
        model = Stack(1)
        before = model.head.weight.detach().clone()
        opt, _ = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2))
        assert isinstance(opt, cls)
        model(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
        opt.step()
        assert not torch.equal(before, model.head.weight)


# ------------------------------------------------------------------------------------ loop and resume

def test_resume_gives_the_same_trajectory(compiled, corpus, tmp_path):
    config = TrainConfig(steps=6, batch=2, seq=SEQ, lr=3e-3, aga=True, accum=2, max_accum=4, lclr=True, warmup=1,
                         eval_every=2, eval_batches=1, checkpoint_every=3, seed=1)
    straight = train(fresh(compiled), corpus, config, log_dir=tmp_path / "straight")

    def crash(record):
        if record["step"] == 4:  # after the step-3 checkpoint, with step 4 already logged
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh(compiled), corpus, config, log_dir=tmp_path / "resumed", on_step=crash)
    resumed = train(fresh(compiled), corpus, config, log_dir=tmp_path / "resumed", resume=True)
    assert [r["step"] for r in resumed.history] == list(range(6))
    for key in ("loss", "accum", "lr", "lr_last", "tokens", "sigma2"):
        assert [r[key] for r in resumed.history] == [r[key] for r in straight.history], key
    assert [v["val_loss"] for v in resumed.validation] == [v["val_loss"] for v in straight.validation]
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in straight.history]
    assert {"loss", "lr", "accum", "tokens_per_s", "step_s"} <= set(lines[0])
    assert "val_loss" in lines[1] and "val_loss" not in lines[0]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["data"]["source"] == "stdlib"
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]


def test_ort_backend_runs_the_same_loop_and_resumes(corpus, tmp_path):
    """ONNX Runtime artifacts train through the same loop: warm-up then cosine LR per step, validation,
    checkpoint/resume onto the same trajectory, the summary naming the backend."""
    pytest.importorskip("onnxruntime.training")
    from effcompile.export.onnx import export_training_artifacts
    from effcompile.train import OrtBackend

    spec = tiny_spec("gpt2", seq=SEQ, vocab_size=256)
    folder = tmp_path / "onnx"
    export_training_artifacts(effcompile.compile(spec, verify=False, measure=False).program, folder, lr=3e-3)
    config = TrainConfig(steps=4, batch=2, seq=SEQ, lr=3e-3, warmup=1, schedule="cosine", eval_every=2,
                         eval_batches=1, checkpoint_every=2, seed=1)
    straight = train(OrtBackend(folder, config), corpus, config, log_dir=tmp_path / "straight")

    def crash(record):
        if record["step"] == 2:  # after the step-2 checkpoint, with step 2 already logged
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(OrtBackend(folder, config), corpus, config, log_dir=tmp_path / "resumed", on_step=crash)
    resumed = train(OrtBackend(folder, config), corpus, config, log_dir=tmp_path / "resumed", resume=True)
    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3]
    assert [r["lr"] for r in straight.history] == pytest.approx([3e-3, 3e-3, 3e-3 * 0.75, 3e-3 * 0.25])
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], rel=1e-5)
    assert [v["step"] for v in resumed.validation] == [2, 4]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["backend"] == "ort" and summary["steps"] == 4 and summary["tokens"] == 4 * 2 * SEQ
    assert (tmp_path / "resumed" / "ort_checkpoint").exists()


def test_target_loss_stops_training(compiled, corpus):
    config = TrainConfig(steps=50, batch=2, seq=SEQ, lr=3e-3, eval_every=1, eval_batches=1, target_loss=10.0)
    result = train(fresh(compiled), corpus, config)
    assert result.steps == 1 and result.target_reached["step"] == 1


def test_input_errors(compiled, corpus):
    with pytest.raises(SpecError, match="sequence length 16"):
        Trainer(fresh(compiled), corpus, TrainConfig(seq=32))
    with pytest.raises(OptionError, match="warmup"):
        TrainConfig(steps=5, warmup=5)
    with pytest.raises(OptionError, match="optimizer"):
        TrainConfig(optimizer="sgd")

    class TwoInputs(torch.nn.Module):
        def forward(self, idx, image):
            return idx

    with pytest.raises(SpecError, match="image"):
        input_builder(TwoInputs())
    with pytest.raises(SpecError, match="CompileResult or a torch.nn.Module"):
        train("model", corpus)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_trains_a_saved_folder_and_resumes(compiled, tmp_path):
    folder = fresh(compiled).save(str(tmp_path / "compiled"))
    out = tmp_path / "run"
    common = [folder, "--max-bytes", "50000", "--batch", "2", "--seq", str(SEQ), "--eval-every", "2",
              "--eval-batches", "1", "--quiet", "--out", str(out), "--aga", "--lclr", "--optimizer", "lamb"]
    assert train_main([*common, "--steps", "2"]) == 0
    assert train_main([*common, "--steps", "3", "--resume"]) == 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    with pytest.raises(OutputError, match="already holds a training run"):
        train_main([*common, "--steps", "2"])


def test_cli_errors(tmp_path):
    with pytest.raises(SpecError, match="vocab_size"):
        train_main(["hf:gpt2", "--model-arg", "vocab_size=100", "--steps", "1"])
    with pytest.raises(OptionError, match="--resume needs --out"):
        train_main(["hf:gpt2", "--resume"])
    with pytest.raises(SpecError, match="--backend ort needs"):
        train_main([str(tmp_path), "--backend", "ort"])
    with pytest.raises(OptionError, match="--aga not available with --backend ort"):
        train_main([str(tmp_path), "--backend", "ort", "--aga"])
    with pytest.raises(SpecError, match="does not exist"):
        train_main(["hf:gpt2", "--data", str(tmp_path / "none")])
