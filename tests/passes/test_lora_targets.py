"""``lora``'s default targets (issue #18 item 7): the attention projections the matcher finds (T5's q/k/v/o,
DeBERTa-v2's query_proj/…/output.dense) load in real PEFT; nothing to adapt and targets PEFT cannot wrap are
refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import effcompile
from effcompile.capture import capture
from effcompile.errors import PassError
from effcompile.export.peft import save_peft_adapter
from effcompile.pass_manager import PassManager, resolve_passes
from effcompile.passes.lora import lora_modules
from effcompile.spec import ModelSpec, load_hf_spec

from conftest import generic_tiny_overrides

TINY = {"t5": {"dropout_rate": 0.0},
        "deberta-v2": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def _lora(program, options=None):
    resolved = resolve_passes(["lora"], {"lora": options or {}})
    result = PassManager(resolved, verify=False, measure=False).run(program)
    return result.program, result.records[-1]


@pytest.mark.parametrize("model_type", list(TINY))
def test_default_targets_find_attention_projections_and_load_in_peft(model_type, tmp_path):
    peft = pytest.importorskip("peft")
    spec = load_hf_spec(model_type, {**generic_tiny_overrides(model_type), **TINY[model_type]}, batch=2, seq=8)
    adapted, record = _lora(capture(spec), {"rank": 4, "alpha": 8})
    names = set(record.details["module_names"])
    expected = {"q", "k", "v", "o"} if model_type == "t5" else {"query_proj", "key_proj", "value_proj"}
    assert expected <= names, names
    assert set(record.details["attention_projections"]) <= set(record.details["targets_matched"])
    if model_type == "t5":  # found by the matcher, not by name: every self- and cross-attention of both stacks
        assert len(record.details["attention_projections"]) == 4 * (2 + 2 * 2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in lora_modules(adapted.gm).values():
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * 0.05)
    folder = save_peft_adapter(adapted, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(spec.module), str(folder))
    loaded.train()
    theirs = {n for n, _ in loaded.named_parameters() if "lora_A" in n}
    assert len(theirs) == len(record.details["targets_matched"])
    torch.testing.assert_close(loaded(**spec.kwargs).logits, adapted.run().logits, rtol=1e-5, atol=1e-5)


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


def test_nothing_to_adapt_is_refused_as_peft_does():
    spec = ModelSpec(_MLP(), (torch.randn(2, 8),), {}, None, "mlp")
    with pytest.raises(PassError, match=r"no attention projection found .* named fc1, fc2; set --set lora.targets"):
        effcompile.compile(spec, passes=["lora"], verify=False, measure=False)


class _Router(torch.nn.Module):
    """A module computing ``F.linear`` on its own weight (as Mixtral's router): PEFT cannot wrap it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return F.linear(x, self.weight)


class _Routed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Router()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) * self.gate(x).softmax(-1).sum(-1, keepdim=True)


def test_a_target_peft_cannot_wrap_is_refused():
    spec = ModelSpec(_Routed(), (torch.randn(2, 8),), {}, None, "routed")
    with pytest.raises(PassError, match=r"target gate is a _Router .* PEFT cannot load an adapter on it"):
        effcompile.compile(spec, passes=["lora"], options={"lora": {"targets": ("gate", "proj")}}, verify=False,
                           measure=False)
    result = effcompile.compile(spec, passes=["lora"], options={"lora": {"targets": ("proj",)}}, verify=False,
                                measure=False)
    assert result.report.records[-1].details["targets_matched"] == ["proj"]
