"""Capture of a model whose forward reaches a submodule through a closure (minGPT's ``self.mlpf = lambda``):
``copy.deepcopy`` keeps the closure pointing at the user's model, so the captured copy must be re-pointed
to its own parameters, or it would train nothing there and alias the user's weights (issue #18 A1)."""

import sys
from pathlib import Path

import pytest
import torch

from effcompile.capture import capture
from effcompile.errors import CaptureError
from effcompile.spec import ModelSpec

MINGPT = Path(__file__).resolve().parents[2] / "tools" / "zoo" / "vendored" / "mingpt"


class ClosureBlock(torch.nn.Module):
    """A linear reached only through a lambda closure; an ``assert`` on a shape makes symbolic tracing
    fall back to export, as in minGPT."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.mlp = torch.nn.Linear(8, 8)
        mlp = self.mlp
        self.mlpf = lambda x: torch.relu(mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlpf(self.inp(x)).sum()


class ClosureTraced(ClosureBlock):
    """The same, symbolically traceable (the closure's tensors reach the tracer directly)."""

    def __init__(self) -> None:
        super().__init__()
        weight, bias = self.mlp.weight, self.mlp.bias
        self.mlpf = lambda x: torch.nn.functional.linear(x, weight, bias)


class HiddenTrainable(torch.nn.Module):
    """Trains a tensor that is no parameter of the model: nothing can re-point it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        hidden = torch.randn(8, 8, requires_grad=True)
        self.f = lambda x: x @ hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.inp(x)).sum()


def _check_copy_trains_its_own(spec: ModelSpec, path: str) -> None:
    program = capture(spec, path=path)
    params = dict(program.gm.named_parameters())
    originals = {id(p) for p in spec.module.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in spec.module.parameters()}
    for name, tensor in [*program.gm.named_parameters(), *program.gm.named_buffers()]:
        assert id(tensor) not in originals and tensor.untyped_storage().data_ptr() not in storages, name
    loss = program.run()
    loss.backward()
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters of the captured copy get no gradient: {missing}"
    # Training the user's model leaves the copy alone, and the copy still computes what it did.
    before = program.run().detach()
    with torch.no_grad():
        for p in spec.module.parameters():
            p.add_(1.0)
    torch.testing.assert_close(program.run().detach(), before)


@pytest.mark.parametrize("model, path", [(ClosureBlock, "export"), (ClosureTraced, "auto")])
def test_closure_over_submodule_trains_the_copys_parameters(model, path):
    torch.manual_seed(0)
    _check_copy_trains_its_own(ModelSpec(model(), (torch.randn(2, 8),)), path)


def test_trainable_tensor_outside_the_model_is_refused():
    torch.manual_seed(0)
    with pytest.raises(CaptureError, match="no parameter/buffer name"):
        capture(ModelSpec(HiddenTrainable(), (torch.randn(2, 8),)), path="export")


def test_mingpt_lambda_mlp_trains_in_the_captured_copy():
    sys.path.insert(0, str(MINGPT))
    try:
        import effcompile_model as mingpt
    finally:
        sys.path.remove(str(MINGPT))
    idx, targets = mingpt.example_inputs()
    spec = ModelSpec(mingpt.build_model(), (idx, targets), loss_fn=lambda out, *a: out[1])
    program = capture(spec)
    loss = program.run()[1]
    loss.backward()
    grads = {n: p.grad for n, p in program.gm.named_parameters()}
    assert grads["transformer.h.0.mlp.c_fc.weight"] is not None
    assert not [n for n, g in grads.items() if g is None]
    assert not any(n.startswith("lifted_tensor") or ".lifted_tensor" in n for n, _ in program.gm.named_buffers())
