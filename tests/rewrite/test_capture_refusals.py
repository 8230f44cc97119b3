"""Capture refusals name where and what to do (issue #18 B5, B6): a library model's own source line, a
config's layerdrop, a tensor attribute that cannot be copied."""

from __future__ import annotations

import types

import pytest
import torch

from effcompile.capture import capture
from effcompile.errors import CaptureError
from effcompile.spec import ModelSpec


class _LayerDrop(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(layerdrop=0.1, encoder_layerdrop=0.0)
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        if torch.rand([]) < self.config.layerdrop:  # a random Python branch, as 47 transformers models have
            return x
        return self.linear(x).sum()


def test_layerdrop_refusal_says_to_turn_it_off():
    with pytest.raises(CaptureError, match=r"layerdrop=0.1 .*set --model-arg layerdrop=0$"):
        capture(ModelSpec(_LayerDrop(), (torch.randn(2, 4),), name="drop"), path="export")


class _ComputedAttribute(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.state = self.linear.weight * 2  # not a leaf: deepcopy refuses it

    def forward(self, x):
        return self.linear(x).sum()


def test_a_computed_tensor_attribute_is_named():
    with pytest.raises(CaptureError, match=r"tensor attribute state is computed from parameters .* register it as a buffer"):
        capture(ModelSpec(_ComputedAttribute(), (torch.randn(2, 4),), name="computed"))


def test_a_library_models_error_names_its_own_source_line():
    """Frames of effcompile and of the tracer (torch) are skipped; a model inside site-packages is named by
    its path under site-packages."""
    from effcompile.locate import error_line as _where

    site = "/venv/lib/python3.11/site-packages/"
    namespace: dict = {}
    exec(compile("def forward():\n    raise ValueError('data-dependent')\n",
                 site + "transformers/models/toy/modeling_toy.py", "exec"), namespace)
    # The tracer (a torch frame) calls the model and catches: the traceback holds only those two frames.
    exec(compile("def trace(f):\n    try:\n        f()\n    except ValueError as e:\n        return e\n",
                 site + "torch/export/_trace.py", "exec"), namespace)
    error = namespace["trace"](namespace["forward"])
    assert _where(error) == "ValueError: data-dependent at transformers/models/toy/modeling_toy.py:2"


class _VmappedMask(torch.nn.Module):
    """A mask built by vmapping an indexing mask function, as transformers' masking utilities do with
    ``use_vmap=True`` (T5Gemma 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

        def allowed(i, j):
            return mask[i, j]

        with TransformGetItemToIndex():
            rows = torch.vmap(torch.vmap(allowed, in_dims=(None, 0)), in_dims=(0, None))
            full = rows(torch.arange(4), torch.arange(4))
        return self.linear(x) * full


def test_indexing_inside_vmap_is_refused_naming_the_line():
    # Exported, it replays as a call that leaks vmap's batched tensors (an internal error later, before).
    spec = ModelSpec(_VmappedMask(), (torch.randn(4, 4), torch.ones(4, 4, dtype=torch.bool)), name="vmapped")
    with pytest.raises(CaptureError, match=r"indexes a tensor inside torch.vmap at .*test_capture_refusals.py:\d+"):
        capture(spec, path="export")


class _StraightThrough(torch.autograd.Function):
    """Rounds forward, passes the gradient straight through: its backward is not the forward's derivative."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Doubling(torch.autograd.Function):
    """A custom Function whose backward is the forward's derivative."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class _Applies(torch.nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.function = function

    def forward(self, x):
        return self.function.apply(self.linear(x)).sum()


def test_a_custom_backward_that_export_drops_is_refused_not_trained_silently_otherwise():
    # torch.export keeps the forward of an autograd.Function and drops its backward: the graph's gradient of a
    # straight-through estimator is round()'s, zero, and lin would never train.
    spec = ModelSpec(_Applies(_StraightThrough), (torch.randn(2, 4),), {}, lambda out, x: out, "ste")
    with pytest.raises(CaptureError, match=r"custom autograd.Function _StraightThrough at .*test_capture_refusals.py"
                                           r".*gradients differ"):
        capture(spec, path="export")
    same = capture(ModelSpec(_Applies(_Doubling), (torch.randn(2, 4),), {}, lambda out, x: out, "doubling"),
                   path="export")
    assert same.meta["custom_functions"] == ["_Doubling"]
