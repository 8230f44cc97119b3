"""``lowrank``: sites per architecture, exact at full rank, error falls as rank rises, energy, min_saving,
per-layer report, errors, idempotence, the symbolic-trace example."""

from __future__ import annotations

import pytest
import torch

import effcompile
from effcompile.capture import capture
from effcompile.errors import OptionError, PassError
from effcompile.pass_manager import PassManager, resolve_passes
from effcompile.passes.lowrank import LowRankLinear

from conftest import example_gpt_spec, tiny_spec

# Every linear but the LM head: GPT-2 4 per block, Llama 7 per block, BERT 6 per block + the MLM
# head's transform (its decoder is the excluded head).
EXPECTED_LAYERS = {"gpt2": 8, "llama": 14, "bert": 13}


@pytest.fixture(scope="module")
def programs():
    return {arch: capture(tiny_spec(arch)) for arch in EXPECTED_LAYERS}


def run(program, options, max_error=None, verify=True):
    resolved = resolve_passes(["lowrank"], {"lowrank": options})
    result = PassManager(resolved, verify=verify, measure=False, max_error=max_error).run(program)
    return result.program, result.records[-1]


def factorised(gm):
    return {name: m for name, m in gm.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("arch", list(EXPECTED_LAYERS))
def test_full_rank_is_exact(programs, arch):
    # energy 1.0 keeps every singular value of every layer, whatever its shape (Llama's GQA k/v are 32×64).
    new, record = run(programs[arch], {"energy": 1.0, "min_saving": -10.0})
    assert record.changed and not record.exact
    layers = record.details["layers"]
    assert len(layers) == EXPECTED_LAYERS[arch] == len(factorised(new.gm))
    assert all(not p.endswith(("lm_head", "decoder")) for p in factorised(new.gm))
    assert all(layer["relative_frobenius_error"] < 1e-6 for layer in layers)
    assert record.verify.output_max_rel < 1e-4
    # Factors are trainable; the biases stay under their old names.
    module = next(iter(factorised(new.gm).values()))
    assert module.down.weight.requires_grad and module.up.weight.requires_grad
    calls = [n for n in new.gm.graph.nodes if n.op == "call_module" and n.target in factorised(new.gm)]
    assert len(calls) == EXPECTED_LAYERS[arch]


def test_error_falls_as_rank_rises_and_report_is_per_layer(programs):
    program = programs["llama"]
    output_errors, weight_errors = [], []
    for rank in (4, 12, 28):  # ≤ 32, the smallest dimension (GQA k/v 32×64)
        _, record = run(program, {"rank": rank})
        output_errors.append(record.verify.output_max_rel)
        weight_errors.append(record.details["worst_relative_frobenius_error"])
        layer = record.details["layers"][0]
        assert layer["rank"] == rank
        assert layer["params_after"] == rank * (layer["in"] + layer["out"])
        assert layer["param_saving"] == pytest.approx(1 - layer["params_after"] / layer["params_before"])
        assert layer["flop_saving"] == pytest.approx(layer["param_saving"])
    assert output_errors[0] > output_errors[1] > output_errors[2]
    assert weight_errors[0] > weight_errors[1] > weight_errors[2]
    # max_error turns the reported error into a failure.
    with pytest.raises(Exception, match="exceeds --max-error 0.001"):
        run(program, {"rank": 4}, max_error=1e-3)


def test_energy_min_saving_and_targets(programs):
    program = programs["gpt2"]
    _, full = run(program, {"energy": 1.0, "min_saving": -10.0})
    assert full.verify.output_max_rel < 1e-4
    _, half = run(program, {"energy": 0.5})
    for layer in half.details["layers"]:
        assert layer["energy_kept"] >= 0.5 - 1e-6 and layer["rank"] < layer["max_rank"]
    # min_saving skips layers that would not save enough; saying why.
    _, record = run(program, {"rank": 24, "min_saving": 0.5})
    kept = {layer["path"] for layer in record.details["layers"]}
    assert kept == {p for p in kept if p.endswith(("c_attn", "c_fc", "mlp.c_proj"))} and kept
    assert any("below min_saving" in why for why in record.details["skipped"].values())
    _, record = run(program, {"rank": 8, "targets": "c_fc"})
    assert [layer["path"] for layer in record.details["layers"]] == [f"transformer.h.{i}.mlp.c_fc" for i in range(2)]
    _, record = run(program, {"rank": 60, "min_saving": 0.9})
    assert not record.changed and "skipped" in record.reason


def test_symbolic_trace_example_and_running_twice_changes_nothing():
    program = capture(example_gpt_spec())
    new, record = run(program, {"rank": 16, "targets": "h.*.mlp.*"})
    assert record.verify.output_max_rel > 0
    assert record.changed and len(factorised(new.gm)) == 8
    resolved = resolve_passes(["lowrank"], {"lowrank": {"rank": 16}})
    second = PassManager(resolved, verify=False, measure=False).run(new).records[-1]
    # the factorised layers are no longer plain linears: only the attention ones remain to factorise
    assert {layer["path"].rsplit(".", 1)[-1] for layer in second.details["layers"]} == {"qkv", "proj"}
    assert len(factorised(new.gm)) == 8  # the first program is untouched (passes work on a clone)


@pytest.mark.parametrize("options, error, message", [
    ({"rank": 65}, PassError, "lowrank: rank 65 exceeds the largest rank of transformer.h.0.attn.c_attn "
                              "(192×64 allows at most 64)"),
    ({"energy": 0.0}, OptionError, "lowrank: energy 0.0 is outside (0, 1]"),
    ({"energy": 1.5}, OptionError, "lowrank: energy 1.5 is outside (0, 1]"),
    ({}, OptionError, "lowrank: set exactly one of rank and energy"),
    ({"rank": 4, "energy": 0.9}, OptionError, "lowrank: set exactly one of rank and energy"),
    ({"rank": 0}, OptionError, "lowrank: rank 0 must be a positive integer"),
    ({"rank": 4, "min_saving": 1.0}, OptionError, "lowrank: min_saving 1.0 must be below 1"),
    ({"rank": 4, "targets": "nothing_here"}, PassError, "lowrank: targets nothing_here match no linear layer"),
])
def test_errors(programs, options, error, message):
    with pytest.raises(error) as raised:
        run(programs["gpt2"], options)
    assert message in str(raised.value)


def test_tied_weights_are_left_alone():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 16)
            self.hidden = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 32, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.hidden(self.embed(ids))))

    import effcompile

    result = effcompile.compile(Tied(), (torch.randint(0, 32, (2, 8)),), passes=["lowrank"],
                                options={"lowrank": {"rank": 4, "targets": "*"}}, measure=False)
    record = result.report.records[0]
    assert [layer["path"] for layer in record.details["layers"]] == ["hidden"]
    assert "tied" in record.details["skipped"]["head"]


def test_mixture_of_experts_routers_are_left_out_of_all():
    # Mixtral's router feeds softmax → topk (expert choice): factorising it would change which experts run
    from effcompile.spec import load_hf_spec

    from conftest import generic_tiny_overrides

    spec = load_hf_spec("mixtral", {**generic_tiny_overrides("mixtral"), "num_local_experts": 4,
                                    "num_experts_per_tok": 2}, batch=2, seq=8)
    program = capture(spec)
    out, record = run(program, {"rank": 4, "min_saving": -10.0}, verify=False)  # every other linear factorised
    routers = {path: why for path, why in record.details["skipped"].items() if "router" in why}
    assert sorted(routers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], record.details["skipped"]
    assert all("topk" in why for why in routers.values())
    assert not any(path.endswith("mlp.gate") for path in factorised(out.gm))
    assert any(path.endswith("self_attn.q_proj") for path in factorised(out.gm))
    # named explicitly, a router is the user's choice
    out, _ = run(program, {"rank": 4, "min_saving": -10.0, "targets": ("gate",)}, verify=False)
    assert any(path.endswith("mlp.gate") for path in factorised(out.gm))


class _ChainedLinears(torch.nn.Module):
    """Kimi Linear's forget gate: a linear straight into another linear."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64))

    def forward(self, x):
        return self.gate(x).square().mean()


@pytest.mark.parametrize("exported", [False, True])
def test_a_linear_straight_into_another_is_factorised_with_it(exported):
    cls = type("Chained", (_ChainedLinears,), {"__module__": "transformers.fake"}) if exported else _ChainedLinears
    result = effcompile.compile(cls(), (torch.randn(4, 64),), passes=["lowrank"], options={"lowrank": {"rank": 8}},
                                loss_fn=lambda out, x: out)
    record = result.report.records[0]
    assert record.changed and record.stats["layers_factorised"] == 2 and record.verify.ok
    assert "replaced_sites" not in result.module.meta
