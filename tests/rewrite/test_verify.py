"""Verification measures an approximate pass's own error: dropout is off on both sides (it used to compare
two different dropout draws and report errors of ~1); exact passes still run as captured, same seed."""

import pytest
import torch
import torch.nn.functional as F

import effcompile
from effcompile.verify import DropoutOff

from conftest import tiny_spec

DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def test_dropout_off_zeroes_every_dropout_call_and_attention_dropout():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 16)
    mode = DropoutOff()
    with mode:
        assert torch.equal(F.dropout(x, 0.5, training=True), x)
        assert torch.equal(torch.nn.Dropout(0.3)(x), x)
        assert torch.equal(torch.ops.aten.dropout.default(x, 0.5, True), x)
        output, mask = torch.ops.aten.native_dropout.default(x, 0.5, True)
        assert torch.equal(output, x) and bool(mask.all())
        expected = F.scaled_dot_product_attention(x, x, x)
        torch.testing.assert_close(F.scaled_dot_product_attention(x, x, x, dropout_p=0.9), expected)
        torch.testing.assert_close(F.scaled_dot_product_attention(x, x, x, None, 0.9), expected)
        assert torch.equal(F.dropout(x, 0.0), x)  # p = 0 already: not counted
    assert mode.calls == 6
    assert not torch.equal(F.dropout(x, 0.5, training=True), x)  # the mode is gone afterwards


def test_an_approximate_pass_on_a_model_with_dropout_reports_its_own_error():
    # sas keeping every tile computes exactly dense attention: its own error is round-off. With dropout
    # on, the two sides drew different masks (the sparse kernel draws its own) and the error was ~1.
    spec = tiny_spec("gpt2", seq=32, **DROPOUT)
    result = effcompile.compile(spec, passes=["sas"], measure=False,
                                options={"sas": {"pattern": "dense", "block_size": 8, "backend": "gather"}})
    verify = result.report.record("sas").verify
    assert verify.dropout_off and verify.dropout_calls > 0
    assert verify.output_max_rel < 1e-4 and verify.grad_max_rel < 1e-3


def test_an_exact_pass_is_still_verified_with_dropout_as_captured():
    spec = tiny_spec("gpt2", seq=16, **DROPOUT)
    result = effcompile.compile(spec, passes=["identity"], measure=False)
    verify = result.report.record("identity").verify
    assert verify.ok and not verify.dropout_off and verify.dropout_calls == 0
    assert verify.output_max_abs == 0.0


@pytest.mark.parametrize("exact", [True, False])
def test_verification_counts_each_sides_training_step(exact):
    spec = tiny_spec("gpt2", seq=16)
    result = effcompile.compile(spec, passes=["identity"], measure=False)
    verify = result.report.record("identity").verify
    assert verify.training_flops_reference == verify.training_flops_candidate > 0
    assert result.report.model["training_flops"] == verify.training_flops_reference
