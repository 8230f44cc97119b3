"""The ``pipeline`` pass: exact partition, stages that compose to the original, options and errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effcompile
from effcompile.capture import capture
from effcompile.errors import OptionError, PassError, PipelineError
from effcompile.passes.pipeline import Pipeline, bubble_fraction, stage_modules
from effcompile.passes.pipeline.partition import solve
from effcompile.plans import PipelinePlan, TiedParameter
from effcompile.train.pipeline import build_stages
from effcompile.verify import compare

from conftest import example_gpt_spec, tiny_spec


def _compile(spec, **options):
    return effcompile.compile(spec, passes=["pipeline"], options={"pipeline": options})


@pytest.fixture(scope="module")
def gpt2_result():
    return _compile(tiny_spec("gpt2", batch=4), stages=2)


@pytest.fixture(scope="module")
def llama_result():
    return _compile(tiny_spec("llama", batch=4), stages=2)


@pytest.mark.parametrize("name", ["gpt2_result", "llama_result"])
def test_stages_compose_to_the_original(name, request):
    result = request.getfixturevalue(name)
    record = result.report.record("pipeline")
    assert record.changed and record.verify.ok
    # Gradients are compared under the original names, none left out.
    assert record.verify.grads_compared > 0 and record.verify.grads_not_compared == []
    assert record.verify.output_max_rel < 1e-5 and record.verify.grad_max_rel < 1e-4
    stages = stage_modules(result.module)
    assert len(stages) == 2 and stages == result.program.plan(PipelinePlan).modules
    assert {n for n, _ in result.module.named_parameters()} == {n for n, _ in result.program.gm.named_parameters()}
    # One cut inside the decoder stack at a residual point: it sends one hidden state (batch 4, seq 16,
    # width 64, float32) and nothing else (masks, rotary tables and sizes are recomputed).
    (cut,) = record.details["cuts"]
    assert cut["bytes"] == 4 * 16 * 64 * 4 and len(cut["tensors"]) == 1
    assert ".h." in cut["before"] or ".layers." in cut["before"]


def test_each_stage_runs_on_its_own(gpt2_result):
    """Stage 0 takes input_ids, stage 1 takes the hidden state and labels; chained by hand they give
    the original loss and the same gradients, and run at another batch size (sizes are re-read)."""
    plan = gpt2_result.program.plan(PipelinePlan)
    assert plan.direct_inputs == [["input_ids"], ["labels"]] and plan.target_inputs == ["labels"]
    assert plan.tied == [TiedParameter("transformer.wte.weight", [0, 1])]
    first, last = stage_modules(gpt2_result.module)
    assert not any(n.op == "placeholder" and n.name == "input_ids" for n in last.graph.nodes)
    spec = tiny_spec("gpt2", batch=3)  # another batch size than captured
    reference = spec.module(**spec.kwargs).loss
    (hidden,) = first(spec.kwargs["input_ids"])
    outputs = last(hidden, spec.kwargs["labels"])
    loss = outputs[plan.loss_output_index]
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    reference.backward()
    named = dict(spec.module.named_parameters())
    for name, parameter in last.named_parameters():
        torch.testing.assert_close(parameter.grad, named[name.replace("lm_head", "transformer.wte")].grad
                                   if name == "lm_head.weight" else named[name].grad, rtol=1e-4, atol=1e-6)


def test_the_plan_is_typed_and_cloned_with_the_program(gpt2_result):
    """The runtime reads a PipelinePlan stored by type; a clone's plan refers to the clone's own stages."""
    program = gpt2_result.program
    clone = program.clone()
    plan, copied = program.plan(PipelinePlan), clone.plan(PipelinePlan)
    assert copied is not plan and copied.first_nodes == plan.first_nodes and copied.stage_names == plan.stage_names
    assert copied.modules == stage_modules(clone.gm)
    assert all(a is not b for a, b in zip(copied.modules, plan.modules))
    with pytest.raises(PipelineError, match="no pipeline plan"):
        build_stages(capture(tiny_spec("gpt2")), 0, 2, "cpu")


def test_plain_module_captured_by_symbolic_trace():
    result = _compile(example_gpt_spec(), stages=3)
    record = result.report.record("pipeline")
    assert record.verify.ok and record.verify.grads_compared > 0 and len(record.details["cuts"]) == 2
    assert record.details["plan"]["loss_output_index"] is None  # the loss is the model file's loss_fn
    assert record.details["imbalance"] <= 1.15


def test_masks_and_sizes_are_recomputed_not_sent(llama_result):
    stages = llama_result.report.record("pipeline").details["stages"]
    assert stages[1]["recomputed"] and any(n.startswith(("cos", "sin")) for n in stages[1]["recomputed"])
    last = stage_modules(llama_result.module)[1]
    sizes = [n for n in last.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert sizes and all(n.args[0].op == "placeholder" and n.args[0].name != "input_ids" for n in sizes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=8), st.data())
def test_partition_is_optimal_against_brute_force(costs, data):
    m = len(costs)
    stages = data.draw(st.integers(1, m))
    traffic = [0] + data.draw(st.lists(st.integers(0, 9), min_size=m - 1, max_size=m - 1))
    slack = data.draw(st.sampled_from([0.0, 0.1, 0.5]))
    result = solve(costs, stages, traffic, slack)

    def stage_costs(cuts):
        bounds = (0, *cuts, m)
        return [sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    every = list(itertools.combinations(range(1, m), stages - 1))
    best = min(max(stage_costs(c)) for c in every)
    least_bytes = min(sum(traffic[i] for i in c) for c in every if max(stage_costs(c)) <= best * (1 + slack))
    assert result.best_max_cost == best
    assert len(result.starts) == stages and result.max_cost <= best * (1 + slack)
    assert sum(result.cut_bytes) == least_bytes
    assert all(c >= 0 for c in result.group_costs) and sum(result.group_costs) == sum(costs)


def test_24_layer_gpt_in_4_stages_is_balanced():
    program = capture(tiny_spec("gpt2", batch=2, seq=8, n_layer=24, n_embd=32, n_head=2, vocab_size=64))
    record = Pipeline()(program, Pipeline.Config(stages=4))
    details = record.details
    assert details["imbalance"] <= 1.10, details["imbalance"]
    assert len(details["stages"]) == 4 and all(s["nodes"] > 0 for s in details["stages"])
    # Every cut sends exactly one hidden state (2 x 8 x 32 float32): cuts sit between blocks.
    assert [c["bytes"] for c in details["cuts"]] == [2 * 8 * 32 * 4] * 3


@pytest.fixture(scope="module")
def llama_program():
    return capture(tiny_spec("llama", batch=2, seq=8, num_hidden_layers=4))


@pytest.mark.parametrize("balance", ["params", "memory", "time"])
def test_other_balances(balance, llama_program):
    program = llama_program.clone()
    details = Pipeline()(program, Pipeline.Config(stages=2, balance=balance)).details
    costs = [s["cost"] for s in details["stages"]]
    assert details["balance"] == balance and all(c > 0 for c in costs)
    assert details["imbalance"] <= 1.5
    if balance == "params":
        assert sum(costs) == sum(p.numel() for p in {id(p): p for p in program.gm.parameters()}.values())


def test_split_before_and_bubble():
    program = capture(tiny_spec("gpt2", batch=2, seq=8, n_layer=4))
    details = Pipeline()(program, Pipeline.Config(stages=2, split_before=("transformer.h.3",), schedule="gpipe",
                                                  microbatches=6)).details
    assert details["cuts"][0]["before"].startswith("transformer.h.3")
    assert details["imbalance"] > 1.2  # a hand split that the solver would not choose
    assert details["bubble_fraction"] == pytest.approx(1 / 7) == bubble_fraction("gpipe", 2, 6)
    assert bubble_fraction("interleaved", 4, 8, stages_per_rank=2) == pytest.approx(1 / 17)


def test_option_errors():
    with pytest.raises(OptionError, match="stages=0 must be at least 1"):
        Pipeline.Config(stages=0)
    with pytest.raises(OptionError, match="interleaved needs stages_per_rank"):
        Pipeline.Config(stages=3, schedule="interleaved")
    with pytest.raises(OptionError, match="split_before names 2 cuts"):
        Pipeline.Config(stages=2, split_before=("a", "b"))
    with pytest.raises(OptionError, match="microbatches"):
        Pipeline.Config(microbatches=0)


def test_pass_errors():
    program = capture(tiny_spec("gpt2"))
    with pytest.raises(PassError, match="needs 499 cuts but only .* can be cut"):
        Pipeline()(program.clone(), Pipeline.Config(stages=500))
    with pytest.raises(PassError, match="tied weights.*pipeline.tied=replicate"):
        Pipeline()(program.clone(), Pipeline.Config(stages=2, tied="refuse"))
    with pytest.raises(PassError, match="matches no node or module path"):
        Pipeline()(program.clone(), Pipeline.Config(stages=2, split_before=("transformer.h.9",)))


def test_uncuttable_graph_says_where():
    """A model whose blocks exchange integer tensors cannot be cut there; the error names the value."""

    class IntegerHandOff(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            index = self.first(x).argmax(-1)  # an integer tensor feeds the second half
            return self.second(x)[torch.arange(x.shape[0]), index].sum()

    with pytest.raises(PassError, match=r"only floating-point tensors can be sent|can be cut"):
        effcompile.compile(IntegerHandOff(), (torch.randn(3, 4),), passes=["pipeline"],
                           options={"pipeline": {"stages": 4}})


def test_running_twice_and_saving(gpt2_result, tmp_path):
    with pytest.raises(PassError, match="already split"):
        Pipeline()(gpt2_result.program.clone(), Pipeline.Config())
    gpt2_result.save(str(tmp_path / "out"))
    loaded = effcompile.load(str(tmp_path / "out"))
    assert len(stage_modules(loaded)) == 2
    reference = effcompile.Program(loaded, gpt2_result.program.args, gpt2_result.program.kwargs,
                                   capture_path="export")
    assert compare(gpt2_result.program, reference, exact=True).ok
