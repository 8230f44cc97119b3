"""Reproduction (docs/zoo_failures.md, issue #18 item 4): a forward with unused defaulted arguments and a
loss_fn that takes only the inputs the spec gives. `effcompile tools/zoo/repro/loss_fn_positional.py --out /tmp/o
--export onnx` fails: the exporter calls loss_fn(output, x=..., attn_mask=None, is_causal=True)."""
import torch
import torch.nn.functional as F


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, attn_mask=None, is_causal=True):
        return self.proj(x)


def build_model() -> torch.nn.Module:
    """The module."""
    return Net()


def example_inputs() -> tuple:
    """One batch."""
    return (torch.randn(2, 16),)


def loss_fn(output, x):
    return F.mse_loss(output, x)
