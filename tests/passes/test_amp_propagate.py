"""``amp`` clamps float32-extreme scalar constants to the low dtype's range (issue #18 item 5)."""

from __future__ import annotations

import math

import torch

import effcompile
from effcompile.passes.amp.propagate import clamp_scalar
from effcompile.spec import ModelSpec, load_hf_spec

from conftest import generic_tiny_overrides

FLOAT32_MIN = float(torch.finfo(torch.float32).min)  # what capture bakes from ``finfo(scores.dtype).min``


class _MaskedScores(torch.nn.Module):
    """Attention scores masked with float32's minimum, fixed as a constant (as after capture)."""

    def __init__(self, fill: float = FLOAT32_MIN) -> None:
        super().__init__()
        self.q = torch.nn.Linear(16, 16)
        self.k = torch.nn.Linear(16, 16)
        self.fill = fill

    def forward(self, x, mask):
        fill = self.fill  # a Python float: a constant of the traced graph
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        scores = scores.masked_fill(mask, fill)
        scores = torch.where(mask, fill, scores)  # aten.where.ScalarSelf
        return scores.softmax(-1) @ x


def _spec(module: torch.nn.Module) -> ModelSpec:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1)
    return ModelSpec(module, (x, mask), {}, None, "masked")


def test_clamp_scalar_keeps_infinities_and_values_in_range():
    low = float(torch.finfo(torch.bfloat16).min)
    assert clamp_scalar(FLOAT32_MIN, torch.bfloat16) == low
    assert clamp_scalar(-FLOAT32_MIN, torch.float16) == 65504.0
    assert clamp_scalar(-1e9, torch.bfloat16) == -1e9 and clamp_scalar(-1e9, torch.float16) == -65504.0
    assert clamp_scalar(-math.inf, torch.float16) == -math.inf and clamp_scalar(3, torch.float16) == 3


def test_fill_with_float32_minimum_runs_in_bf16_and_matches_runtime_finfo():
    spec = _spec(_MaskedScores())
    result = effcompile.compile(spec, passes=["amp"], verify=False, measure=False)
    details = result.report.records[-1].details
    assert len(details["constants_clamped"]) >= 2, details["constants_clamped"]
    with torch.no_grad():
        output = result.program.run()
    assert torch.isfinite(output).all()
    # eager code reads finfo at run time: the same model with the low dtype's own minimum under autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        spec.module.fill = float(torch.finfo(torch.bfloat16).min)
        expected = spec.module(*spec.args)
    scale = float(expected.float().abs().max())
    assert float((output.float() - expected.float()).abs().max()) <= 2e-2 * scale


def test_deberta_v2_amp_verifies():
    config = {**generic_tiny_overrides("deberta-v2"), "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
              "max_relative_positions": 16, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    spec = load_hf_spec("deberta-v2", config, batch=2, seq=16)
    result = effcompile.compile(spec, passes=["amp"], verify=True, measure=False)
    assert result.report.records[-1].details["constants_clamped"]
    assert result.report.records[-1].verify.ok
    assert math.isfinite(float(result.program.objective(result.program.run())))
