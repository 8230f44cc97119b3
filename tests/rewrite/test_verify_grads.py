"""Verification of gradients: a trainable parameter of the candidate that gets no gradient fails an exact
pass (unless the reference's got none either), and ``grad_max_rel`` names its tensor and is measured against
the same floor the exact check uses (issue #18 A1, C7)."""

import torch

from effcompile.capture import capture
from effcompile.spec import ModelSpec
from effcompile.verify import compare


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)).pow(2).sum()


def _program():
    torch.manual_seed(0)
    return capture(ModelSpec(TwoLinear(), (torch.randn(4, 8),)), path="symbolic_trace")


def test_a_parameter_the_candidate_stops_training_fails_an_exact_pass():
    reference, candidate = _program(), _program()
    candidate.gm.load_state_dict(reference.gm.state_dict())
    # Detach b's weight in the candidate: same forward values, but b.weight no longer gets a gradient.
    graph = candidate.gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "b":
            with graph.inserting_before(node):
                weight = graph.get_attr("b.weight")
                bias = graph.get_attr("b.bias")
                detached = graph.call_method("detach", (weight,))
                linear = graph.call_function(torch.nn.functional.linear, (node.args[0], detached, bias))
            node.replace_all_uses_with(linear)
            graph.erase_node(node)
    candidate.gm.recompile()
    result = compare(reference, candidate, exact=True)
    assert not result.ok
    assert result.no_grad_params == ["b.weight"] and "no gradient (b.weight)" in result.failures[0]


def test_a_parameter_the_model_never_trains_is_listed_not_failed():
    reference, candidate = _program(), _program()
    candidate.gm.load_state_dict(reference.gm.state_dict())
    result = compare(reference, candidate, exact=True)
    assert result.ok, result.failures
    assert result.no_grad_params_reference == []  # symbolic tracing drops the unused module: nothing dead
    assert result.grad_max_rel_param in {"a.weight", "a.bias", "b.weight", "b.bias"}


def test_grad_error_is_relative_to_the_exact_checks_floor_and_names_its_tensor():
    reference, candidate = _program(), _program()
    candidate.gm.load_state_dict(reference.gm.state_dict())
    # Perturb the candidate's output by a tiny term reaching only a.bias (its gradient then is ~1e-9 off):
    # relative to a.bias's own scale that could be large, relative to the floor it is tiny.
    graph = candidate.gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    loss = output.args[0]
    with graph.inserting_before(output):
        bias = graph.get_attr("a.bias")
        tiny = graph.call_function(torch.mul, (graph.call_method("sum", (bias,)), 1e-9))
        new = graph.call_function(torch.add, (loss, tiny))
    output.args = (new,)
    candidate.gm.recompile()
    result = compare(reference, candidate, exact=True)
    assert result.ok, result.failures
    assert result.grad_max_rel < 1e-5
    assert result.grad_max_rel_param is not None


def test_an_exact_pass_after_amp_is_judged_at_bf16_round_off():
    """Issue #18 B1: after amp (ComputePrecision bf16) an exact pass may reorder bf16 reductions; a difference
    of bf16 round-off (here 1e-3 relative in one weight) passes there and fails a float32 program."""
    from effcompile.plans import ComputePrecision
    from effcompile.verify import EXACT_RTOL, exact_tolerances

    assert exact_tolerances(None) == exact_tolerances(ComputePrecision(torch.float32))
    assert exact_tolerances(None)[0] == EXACT_RTOL
    assert exact_tolerances(ComputePrecision(torch.bfloat16))[0] == 4 * torch.finfo(torch.bfloat16).eps
    reference, candidate = _program(), _program()
    state = reference.gm.state_dict()
    state["b.weight"] = state["b.weight"] * (1 + 1e-3)
    candidate.gm.load_state_dict(state)
    assert not compare(reference, candidate, exact=True).ok
    candidate.set_plan(ComputePrecision(torch.bfloat16))
    assert compare(reference, candidate, exact=True).ok
    # A real change (10%) still fails at bf16's tolerance.
    state["b.weight"] = state["b.weight"] * 1.1
    candidate.gm.load_state_dict(state)
    assert not compare(reference, candidate, exact=True).ok
