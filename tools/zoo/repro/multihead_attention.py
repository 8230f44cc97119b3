"""Reproduction (docs/zoo_failures.md, issue #18 item 7): attention through nn.MultiheadAttention (as
torchvision's ViT encoder block), captured by symbolic_trace. `effcompile tools/zoo/repro/multihead_attention.py
--passes sas --set sas.block_size=8 --set sas.window=8` reports "no attention found"."""
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = self.ln(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head((x + h).mean(1))


def build_model() -> torch.nn.Module:
    """The module."""
    return Block()


def example_inputs() -> tuple:
    """One batch."""
    return (torch.randn(2, 16, 32),)


def loss_fn(output, x):
    return output.logsumexp(-1).mean()
