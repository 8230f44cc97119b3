"""FLOPs the report quotes agree with torch.utils.flop_counter: the forward (the LM head included, which
aten.linear used to hide) and the training step, where recomputation shows up and the forward does not."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import effcompile
from effcompile.analysis import analyze
from effcompile.capture import capture

from conftest import example_gpt_spec, tiny_spec


@pytest.fixture(autouse=True)
def math_attention():
    """SDPA's math backend: its matmuls are visible to FlopCounterMode (the CPU flash kernel's are not,
    where the cost model prices attention itself), so both sides count the same ops."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _torch_forward_flops(program):
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        program.run(program.gm)
    return counter.get_total_flops()


def test_forward_flops_agree_with_flop_counter_on_the_bundled_gpt():
    program = capture(example_gpt_spec(), "auto", True)
    reference = _torch_forward_flops(program)
    assert abs(analyze(program).total_flops - reference) <= 0.01 * reference


def test_forward_flops_include_the_lm_head_of_an_exported_model():
    program = capture(tiny_spec("gpt2", seq=16), "auto", True)
    assert program.capture_path == "export"
    analysis = analyze(program)
    reference = _torch_forward_flops(program)
    assert abs(analysis.total_flops - reference) <= 0.01 * reference
    head = next(n for n in program.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    batch, seq, width, vocab = 2, 16, 64, 128
    assert analysis[head].flops == 2 * batch * seq * width * vocab and not analysis[head].estimated


def test_remat_keeps_forward_flops_and_its_recomputation_shows_in_the_training_step():
    spec = tiny_spec("gpt2", seq=16)
    result = effcompile.compile(spec, passes=["remat"], options={"remat": {"policy": "blocks", "head": "keep"}})
    stats = result.report.record("remat").stats
    assert stats["flops_after"] == stats["flops_before"] == result.report.model["flops"]
    # Every block is recomputed in backward: the step grows by the blocks' forward FLOPs, less the trailing
    # ops whose outputs backward does not need (non-reentrant checkpointing stops recomputing early).
    program = capture(tiny_spec("gpt2", seq=16), "auto", True)
    analysis = analyze(program)
    blocks = sum(analysis[n].flops for n in program.gm.graph.nodes
                 if n.name in analysis.costs and not analysis[n].estimated
                 and any(".h." in str(path) for path, _ in (n.meta.get("nn_module_stack") or {}).values()))
    growth = stats["training_flops_after"] - stats["training_flops_before"]
    assert blocks > 0 and 0.5 * blocks < growth <= 1.01 * blocks


def test_remat_plan_flops_are_the_recomputation_without_early_stop_and_bound_it_with():
    """The plan's recompute FLOPs are what the step recomputes with torch's checkpoint early stop off, and an
    upper bound of it with early stop on (the default; the summary says 'at most')."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from effcompile.passes.remat import RematPlan

    # head=keep: a chunked loss head also recomputes its logits in backward (said in the summary, not in the plan's FLOPs)
    result = effcompile.compile(tiny_spec("gpt2", seq=16), passes=["remat"],
                                options={"remat": {"policy": "blocks", "head": "keep"}})
    program, plan = result.program, result.program.plan(RematPlan)
    stats = result.report.record("remat").stats
    assert "recompute at most" in result.report.record("remat").details["summary"]

    def step_flops(early: bool) -> int:
        program.gm.zero_grad()
        with set_checkpoint_early_stop(early), FlopCounterMode(display=False) as counter:
            program.objective(program.run()).backward()
        return counter.get_total_flops()

    base = stats["training_flops_before"]
    assert plan.recompute_flops > 0
    assert step_flops(False) - base == plan.recompute_flops
    assert step_flops(True) - base <= plan.recompute_flops
